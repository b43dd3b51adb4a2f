"""Notice before the interrupt, cancellation_requested(), and cleanup handlers, on real workers."""

from __future__ import annotations

import dagster as dg
from dagster import DagsterRunStatus

from dagster_taskiq_cancel import TaskiqCancelResource, cancel_reconciliation_sensor
from dagster_taskiq_cancel.cooperative import cancellation_requested
from dagster_taskiq_cancel_tests.jobs import (
    broken_cleanup_job,
    flaky_cleanup_job,
    polite_job,
    sleepy_job,
)
from dagster_taskiq_cancel_tests.stack import MOTO_ONLY, Deployment, pid_alive, wait_for

pytestmark = MOTO_ONLY

NOTICE = {"dagster-taskiq/notice_seconds": "20"}


def reconcile_until(
    deployment: Deployment, run_id: str, status: DagsterRunStatus, event: str = ""
) -> None:
    """Tick the reconciliation sensor until the run reaches ``status`` and its engine events
    hold ``event`` (the worker may end the run before the sensor reads its ack)."""
    resource = TaskiqCancelResource(**deployment.settings.model_dump(exclude_none=True))

    def tick() -> bool:
        with dg.build_sensor_context(
            instance=deployment.instance, resources={"taskiq": resource}
        ) as context:
            cancel_reconciliation_sensor(context)
        return deployment.status(run_id) == status and any(
            event in m for m in deployment.engine_messages(run_id)
        )

    wait_for(tick, 60, f"run {run_id} {status.value} through the sensor", interval=0.2)


def test_outside_a_worker_cancellation_requested_is_none() -> None:
    assert cancellation_requested() is None

    @dg.asset
    def checks() -> None:
        assert cancellation_requested() is None

    assert dg.materialize([checks]).success


def test_op_that_checks_stops_cleanly_inside_the_notice_period(deployment: Deployment) -> None:
    deployment.start_worker()
    run_id = deployment.launch(polite_job, seconds=300, tags=NOTICE)
    pid = deployment.op_pid(run_id)
    deployment.wait_status(run_id, {DagsterRunStatus.STARTED})
    assert deployment.instance.run_launcher.terminate(run_id)
    polite = deployment.markers / f"{run_id}.polite"
    wait_for(polite.exists, 15, "the op saw the notice")
    assert 10 < float(polite.read_text()) <= 20
    wait_for(lambda: not pid_alive(pid), 15, "the op's process exited by itself")
    deployment.wait_status(run_id, {DagsterRunStatus.CANCELED}, timeout=30)
    assert "Stopping task" in deployment.worker_log(0)
    assert "SIGKILL" not in deployment.worker_log(0)


def test_op_that_ignores_the_notice_is_interrupted_at_the_deadline(
    deployment: Deployment,
) -> None:
    deployment.start_worker()
    run_id = deployment.launch(sleepy_job, seconds=300, tags={"dagster-taskiq/notice_seconds": "2"})
    pid = deployment.op_pid(run_id)
    deployment.wait_status(run_id, {DagsterRunStatus.STARTED})
    assert deployment.instance.run_launcher.terminate(run_id)
    assert pid_alive(pid), "nothing is interrupted during the notice"
    wait_for(lambda: not pid_alive(pid), 20, "interrupted at the deadline")
    deployment.wait_status(run_id, {DagsterRunStatus.CANCELED}, timeout=30)


def test_cleanup_that_fails_twice_then_succeeds_leaves_the_run_canceled(
    deployment: Deployment,
) -> None:
    deployment.env["TEST_MARKER_DIR"] = str(deployment.markers)
    deployment.start_worker()
    run_id = deployment.launch(flaky_cleanup_job, seconds=300)
    deployment.op_pid(run_id)
    deployment.wait_status(run_id, {DagsterRunStatus.STARTED})
    assert deployment.instance.run_launcher.terminate(run_id)
    attempts = deployment.markers / f"{run_id}.cleanup"
    wait_for(lambda: attempts.exists() and len(attempts.read_text().split("\n")) > 3, 60, "3 tries")
    assert [line.split()[0] for line in attempts.read_text().splitlines()] == ["1", "2", "3"]
    reconcile_until(deployment, run_id, DagsterRunStatus.CANCELED, "acknowledged the cancel")
    acked = [m for m in deployment.engine_messages(run_id) if "acknowledged the cancel" in m]
    assert "cancelled" in acked[0], acked


def test_cleanup_that_always_fails_ends_the_run_failure_with_the_error(
    deployment: Deployment,
) -> None:
    deployment.start_worker()
    run_id = deployment.launch(broken_cleanup_job, seconds=300)
    deployment.op_pid(run_id)
    deployment.wait_status(run_id, {DagsterRunStatus.STARTED})
    assert deployment.instance.run_launcher.terminate(run_id)
    reconcile_until(deployment, run_id, DagsterRunStatus.FAILURE)
    assert any("the scratch bucket is gone" in m for m in deployment.engine_messages(run_id))


def test_cleanup_never_runs_for_a_run_that_finished_on_its_own(deployment: Deployment) -> None:
    deployment.env["TEST_MARKER_DIR"] = str(deployment.markers)
    deployment.start_worker()
    run_id = deployment.launch(flaky_cleanup_job, seconds=0)
    deployment.wait_status(run_id, {DagsterRunStatus.SUCCESS})
    assert not (deployment.markers / f"{run_id}.cleanup").exists()
