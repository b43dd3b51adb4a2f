"""Terminate tells the truth: work that ends by itself is never treated as cancelled, a forged
hint cannot change how a real cancel stops, and a cancel that lands while Dagster starts the run
still ends it CANCELED without running it."""

from __future__ import annotations

import time

from dagster import DagsterEventType, DagsterRunStatus
from dagster._core.events import DagsterEvent

from dagster_taskiq_cancel.messages import CancelRequest
from dagster_taskiq_cancel_tests.jobs import flaky_cleanup_job, sleepy_job, stubborn_job
from dagster_taskiq_cancel_tests.launch_race_jobs import launch_race_config, launch_race_job
from dagster_taskiq_cancel_tests.slow_jobs import slow_import_job
from dagster_taskiq_cancel_tests.stack import MOTO_ONLY, Deployment, pid_alive, wait_for
from dagster_taskiq_cancel_tests.test_graceful import reconcile_until
from dagster_taskiq_cancel_tests.test_steps import _launch

pytestmark = MOTO_ONLY

Status = DagsterRunStatus
STATUS_EVENTS = {
    DagsterEventType.RUN_START,
    DagsterEventType.RUN_CANCELING,
    DagsterEventType.RUN_CANCELED,
    DagsterEventType.RUN_SUCCESS,
    DagsterEventType.RUN_FAILURE,
}


def _acks_sent(deployment: Deployment) -> int:
    counts = deployment.queues.depths()[deployment.queues.names.acks]
    return counts["visible"] + counts["in_flight"]


def _exit_codes(deployment: Deployment, worker: int = 0) -> list[str]:
    lines = deployment.worker_log(worker).splitlines()
    return [line.rsplit(" ", 1)[1] for line in lines if "ended with exit code" in line]


def test_runs_and_steps_that_finish_by_themselves_are_never_signalled(
    deployment: Deployment,
) -> None:
    """Each child exits by itself with 0: no signal, no cancel ack, no cleanup handler."""
    deployment.env["TEST_MARKER_DIR"] = str(deployment.markers)
    deployment.start_worker("--concurrency", "4")
    run_ids = [deployment.launch(flaky_cleanup_job, seconds=0) for _ in range(6)]
    fan_run = _launch(deployment, width=3)
    for run_id in [*run_ids, fan_run]:
        deployment.wait_status(run_id, {Status.SUCCESS}, timeout=180)
    # 6 runs, plus the fan run's own task and its 5 steps.
    wait_for(lambda: len(_exit_codes(deployment)) == 12, 60, "every child exited")
    assert set(_exit_codes(deployment)) == {"0"}, deployment.worker_log(0)
    assert "Stopping task" not in deployment.worker_log(0)
    assert _acks_sent(deployment) == 0
    for run_id in run_ids:
        assert not (deployment.markers / f"{run_id}.cleanup").exists()
        assert not any("acknowledged the cancel" in m for m in deployment.engine_messages(run_id))


def test_an_unsigned_hint_cannot_change_how_a_real_cancel_stops(deployment: Deployment) -> None:
    """Forged notice/grace of an hour, or of zero, are ignored: the settings time the stop."""
    deployment.start_worker()
    patient = deployment.launch(sleepy_job, seconds=300)
    stubborn = deployment.launch(stubborn_job, seconds=300)
    pids = {run_id: deployment.op_pid(run_id) for run_id in (patient, stubborn)}
    for run_id in pids:
        deployment.wait_status(run_id, {Status.STARTED})
    forged = [
        CancelRequest(run_id=patient, notice_seconds=3600, grace_seconds=3600),
        CancelRequest(run_id=stubborn, notice_seconds=0, grace_seconds=0),
    ]
    for request in forged:
        deployment.queues.send(
            deployment.queues.names.cancels, request.to_json(), request.run_id, request.request_id
        )
    wait_for(lambda: _acks_sent(deployment) == 0 and deployment.queue_empty(), 30, "hints read")
    assert all(pid_alive(pid) for pid in pids.values()), "a hint alone stopped live work"

    started = time.monotonic()
    for run_id in pids:
        assert deployment.instance.run_launcher.terminate(run_id)
    wait_for(lambda: not pid_alive(pids[patient]), 15, "the patient run's child gone")
    deployment.wait_status(patient, {Status.CANCELED}, timeout=30)
    wait_for(lambda: not pid_alive(pids[stubborn]), 30, "the stubborn run's child gone")
    # The stubborn op ignores the interrupt: it lives until SIGKILL after the configured grace.
    assert time.monotonic() - started >= deployment.settings.grace_seconds - 0.5
    assert "grace 0.0s" not in deployment.worker_log(0)


def _wait_run_process_started(deployment: Deployment, run_id: str) -> None:
    """Dagster's run process has read the run's status and is importing the job's module."""
    wait_for(
        lambda: any("Started process for run" in m for m in deployment.engine_messages(run_id)),
        120,
        f"run {run_id}'s Dagster process started",
    )


def _event_types(deployment: Deployment, run_id: str) -> list[DagsterEventType]:
    return [
        e.dagster_event.event_type
        for e in deployment.instance.all_logs(run_id)
        if e.dagster_event is not None
    ]


def test_terminate_while_dagster_starts_the_run_ends_canceled_without_running_it(
    deployment: Deployment,
) -> None:
    """Force (CANCELED) and safe (CANCELING) terminate in the window before RUN_START."""
    deployment.env["TEST_SLOW_IMPORT_SECONDS"] = "4"
    deployment.start_worker("--concurrency", "2")
    forced = deployment.launch(slow_import_job, seconds=60)
    safe = deployment.launch(slow_import_job, seconds=60)
    for run_id in (forced, safe):
        _wait_run_process_started(deployment, run_id)
    deployment.instance.report_run_canceled(deployment.instance.get_run_by_id(forced))
    assert deployment.instance.run_launcher.terminate(safe)
    reconcile_until(deployment, safe, Status.CANCELED)
    wait_for(lambda: _exit_codes(deployment) == ["-9", "-9"], 30, "both run processes killed")
    for run_id in (forced, safe):
        assert deployment.status(run_id) == Status.CANCELED
        assert deployment.executions(run_id) == 0
        assert DagsterEventType.RUN_START not in _event_types(deployment, run_id)


def test_cancel_overwritten_by_run_start_is_recorded_again_and_ends_canceled(
    deployment: Deployment,
) -> None:
    """The state Dagster's start race leaves: a cancel in the log, RUN_START's STARTED over it.

    The race itself (a cancel between the run process's last status read and its RUN_START
    write) lasts milliseconds; the test writes the same two records while the worker, with a
    long poll interval, is not looking, then wakes it with a hint.
    """
    deployment.start_worker("--poll-interval-seconds", "600")
    run_id = deployment.launch(sleepy_job, seconds=120)
    pid = deployment.op_pid(run_id)
    deployment.wait_status(run_id, {Status.STARTED})
    run = deployment.instance.get_run_by_id(run_id)
    assert run is not None
    deployment.instance.report_run_canceled(run)  # a force-terminate...
    deployment.instance.report_dagster_event(  # ...and RUN_START landing after it
        DagsterEvent(DagsterEventType.RUN_START.value, job_name=run.job_name), run_id
    )
    assert deployment.status(run_id) == Status.STARTED
    hint = CancelRequest(run_id=run_id)
    deployment.queues.send(deployment.queues.names.cancels, hint.to_json(), run_id, "wake")
    wait_for(lambda: not pid_alive(pid), 30, "the op's process gone")
    deployment.wait_status(run_id, {Status.CANCELED}, timeout=30)
    status_events = [t for t in _event_types(deployment, run_id) if t in STATUS_EVENTS]
    assert status_events[-3:] == [
        DagsterEventType.RUN_START,
        DagsterEventType.RUN_CANCELING,
        DagsterEventType.RUN_CANCELED,
    ], status_events
    assert any("overwritten" in m for m in deployment.engine_messages(run_id))


def test_terminate_while_the_run_launches_a_step_process_stops_it_without_sigkill(
    deployment: Deployment,
) -> None:
    """The interrupt reaches a multiprocess step launched while the run process handled it."""
    deployment.start_worker("--grace-seconds", "60")  # longer than the late step takes to start
    run_id = deployment.launch(
        launch_race_job, run_config=launch_race_config(deployment.markers, 3, 120)
    )
    wait_for((deployment.markers / "launching-late").exists, 180, "step late being launched")
    assert deployment.instance.run_launcher.terminate(run_id)
    deployment.wait_status(run_id, {Status.CANCELED}, timeout=60)
    assert DagsterEventType.RUN_CANCELED in _event_types(deployment, run_id)
    if deployment.executions(run_id):
        wait_for(lambda: not pid_alive(deployment.op_pid(run_id)), 30, "step late gone")
    wait_for(lambda: _exit_codes(deployment) == ["0"], 30, "the run process exited by itself")
    assert "SIGKILL" not in deployment.worker_log(0)
