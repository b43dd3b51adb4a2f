"""Runs go through SQS to a real worker and end exactly as with Dagster's default launcher."""

from __future__ import annotations

import time

from dagster import DagsterRunStatus

from dagster_taskiq_cancel.queues import DEFAULT_POOL
from dagster_taskiq_cancel.tasks import QUEUE_TAG, TASK_ID_TAG, WORKER_ID_TAG
from dagster_taskiq_cancel_tests.jobs import failing_job, sleepy_job
from dagster_taskiq_cancel_tests.stack import MOTO_ONLY, Deployment, pid_alive, wait_for


@MOTO_ONLY
def test_runs_succeed_and_fail_as_with_the_default_launcher(deployment: Deployment) -> None:
    deployment.start_worker()
    ok = deployment.launch(sleepy_job)
    bad = deployment.launch(failing_job)
    deployment.wait_status(ok, {DagsterRunStatus.SUCCESS})
    deployment.wait_status(bad, {DagsterRunStatus.FAILURE})
    tags = deployment.tags(ok)
    assert tags[TASK_ID_TAG] == ok
    assert tags[QUEUE_TAG] == DEFAULT_POOL
    assert tags[WORKER_ID_TAG]
    assert deployment.executions(ok) == 1
    wait_for(deployment.queue_empty, 10, "queues empty")


def test_terminate_stops_the_child_and_dagster_writes_canceled(deployment: Deployment) -> None:
    deployment.start_worker()
    run_id = deployment.launch(sleepy_job, seconds=120)
    pid = deployment.op_pid(run_id)
    deployment.wait_status(run_id, {DagsterRunStatus.STARTED})
    started = time.monotonic()
    assert deployment.instance.run_launcher.terminate(run_id)
    wait_for(lambda: not pid_alive(pid), 10, f"pid {pid} gone")
    print(f"terminate -> child gone: {time.monotonic() - started:.3f}s")
    deployment.wait_status(run_id, {DagsterRunStatus.CANCELED}, timeout=20)
    assert any("canceled" in m.lower() for m in deployment.engine_messages(run_id))
