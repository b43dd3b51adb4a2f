"""A cancelled op with a RetryPolicy is never put up for retry, on either executor.

Ten runs per executor on one worker with a slot for each of their processes, launched together
and terminated together while their ops run: no ``STEP_UP_FOR_RETRY`` in any run, each op ran
once, each run ends CANCELED. Under ``taskiq_executor`` the worker's cancel directory is also
wiped first (``lost``), so that no process can learn of the cancel from its deadline file: the
run storage decides.
"""

from __future__ import annotations

import shutil

from dagster import DagsterEventType, DagsterRunStatus, JobDefinition

from dagster_taskiq_cancel_tests.retry_jobs import retried_multiprocess_job, retried_step_job
from dagster_taskiq_cancel_tests.stack import MOTO_ONLY, Deployment, pid_alive, wait_for

pytestmark = MOTO_ONLY

RUNS = 10
# Twenty Dagster processes start at once on a 2-core machine.
START_TIMEOUT = 240


def _terminate_running_ops(deployment: Deployment, job: JobDefinition, wipe: bool) -> list[str]:
    run_ids = [deployment.launch(job, seconds=600) for _ in range(RUNS)]
    pids = [deployment.op_pid(run_id, timeout=START_TIMEOUT) for run_id in run_ids]
    if wipe:
        for directory in (deployment.root / "tmp").glob("dagster-taskiq-cancel-*"):
            shutil.rmtree(directory)
    for run_id in run_ids:
        assert deployment.instance.run_launcher.terminate(run_id)
    wait_for(lambda: not any(pid_alive(p) for p in pids), 60, "every op stopped")
    for run_id in run_ids:
        deployment.wait_status(run_id, {DagsterRunStatus.CANCELED}, timeout=120)
    return run_ids


def _assert_no_retry(deployment: Deployment, run_ids: list[str]) -> None:
    for run_id in run_ids:
        retries = deployment.instance.get_records_for_run(
            run_id, of_type=DagsterEventType.STEP_UP_FOR_RETRY
        ).records
        assert not retries, f"run {run_id}: a cancel was put up for retry"
        assert deployment.executions(run_id) == 1


def test_a_cancelled_op_is_not_retried_under_the_multiprocess_executor(
    deployment: Deployment,
) -> None:
    deployment.start_worker("--concurrency", str(RUNS))
    run_ids = _terminate_running_ops(deployment, retried_multiprocess_job, wipe=False)
    _assert_no_retry(deployment, run_ids)


def test_a_cancelled_step_whose_deadline_file_is_lost_is_not_retried_under_taskiq_executor(
    deployment: Deployment,
) -> None:
    """The worker cannot write the cancel deadline file: the step asks the run storage. (With
    the file written, ``test_steps``' terminate of RetryPolicy parts covers the same rule.)"""
    (deployment.root / "tmp").mkdir()
    deployment.env["TMPDIR"] = str(deployment.root / "tmp")
    deployment.start_worker("--concurrency", str(2 * RUNS))  # a run task and a step task each
    run_ids = _terminate_running_ops(deployment, retried_step_job, wipe=True)
    assert "Could not write the cancel deadline" in deployment.worker_log(0)
    _assert_no_retry(deployment, run_ids)
