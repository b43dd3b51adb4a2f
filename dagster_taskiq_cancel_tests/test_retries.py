"""Dagster's run retries never re-run a run that a user terminated, whatever status it ends in.

The cancel path writes ``dagster/max_retries: 0`` before it records the intent; Dagster then
computes ``dagster/will_retry: false`` when the run fails, and the auto-reexecution daemon's own
selection (``filter_runs_to_should_retry``) leaves it out. An ordinary failing run is still
selected for a retry, and so is a re-execution of a terminated run.
"""

from __future__ import annotations

from pathlib import Path

from dagster import DagsterRunStatus
from dagster._core.storage.tags import (
    MAX_RETRIES_TAG,
    TAGS_TO_MAYBE_OMIT_ON_RETRY,
    WILL_RETRY_TAG,
)
from dagster._daemon.auto_run_reexecution.auto_run_reexecution import (
    filter_runs_to_should_retry,
)

from dagster_taskiq_cancel.local_sqs import LocalSqsServer
from dagster_taskiq_cancel_tests.jobs import broken_cleanup_job, failing_job
from dagster_taskiq_cancel_tests.stack import MOTO_ONLY, Deployment, pid_alive, wait_for
from dagster_taskiq_cancel_tests.test_sensor import tick_until

pytestmark = MOTO_ONLY

FAILURE = DagsterRunStatus.FAILURE


def retried(deployment: Deployment, run_id: str) -> bool:
    """Whether the auto-reexecution daemon would launch a retry of the run."""
    run = deployment.instance.get_run_by_id(run_id)
    assert run is not None
    return bool(list(filter_runs_to_should_retry([run], deployment.instance)))


def test_a_terminated_run_that_ends_failure_is_not_retried(
    tmp_path: Path, sqs_server: LocalSqsServer
) -> None:
    with Deployment(
        tmp_path,
        sqs_server.endpoint_url,
        instance_config={"run_retries": {"enabled": True, "max_retries": 2}},
    ) as deployment:
        deployment.start_worker()
        failing = deployment.launch(failing_job)
        terminated = deployment.launch(broken_cleanup_job, seconds=300)
        pid = deployment.op_pid(terminated)
        deployment.wait_status(terminated, {DagsterRunStatus.STARTED})
        assert deployment.instance.run_launcher.terminate(terminated)
        assert deployment.tags(terminated)[MAX_RETRIES_TAG] == "0"
        wait_for(lambda: not pid_alive(pid), 30, f"op pid {pid} gone")
        # The cleanup handler fails: the sensor ends the run FAILURE (cleanup_failed).
        tick_until(deployment, lambda: deployment.status(terminated) == FAILURE)
        deployment.wait_status(failing, {FAILURE})
        # A start race ends FAILURE the same way: Dagster's run process fails a run it finds
        # CANCELING (or a lost worker's run is failed); the tag was written before either.
        raced = deployment.create_run(broken_cleanup_job, status=DagsterRunStatus.STARTING)
        assert deployment.instance.run_launcher.terminate(raced.run_id)
        deployment.instance.report_run_failed(deployment.instance.get_run_by_id(raced.run_id))
        assert not retried(deployment, raced.run_id)

        assert deployment.tags(terminated)[WILL_RETRY_TAG] == "false"
        assert not retried(deployment, terminated)
        assert deployment.tags(failing)[WILL_RETRY_TAG] == "true"
        assert retried(deployment, failing), "an ordinary failure is still retried"

        # A re-execution inherits the parent's tags (as Dagster copies them), the cancel's
        # max_retries 0 with them; its launch gives it back the retries the parent had before
        # the cancel (the instance's 2).
        inherited = {
            key: value
            for key, value in deployment.tags(terminated).items()
            if key not in TAGS_TO_MAYBE_OMIT_ON_RETRY
        }
        again = deployment.create_run(
            failing_job, tags=inherited, parent_run_id=terminated, root_run_id=terminated
        )
        deployment.instance.launch_run(again.run_id, workspace=None)  # type: ignore[arg-type]
        deployment.wait_status(again.run_id, {FAILURE})
        assert deployment.tags(again.run_id)[MAX_RETRIES_TAG] == "2"
        assert retried(deployment, again.run_id), "a re-execution of a terminated run retries"
