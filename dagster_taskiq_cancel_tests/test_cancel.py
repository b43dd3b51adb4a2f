"""Terminate stops the right child on any worker; pending work is skipped; nothing runs twice."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import pytest
from dagster import DagsterRunStatus

from dagster_taskiq_cancel.local_sqs import LocalSqsServer
from dagster_taskiq_cancel.tasks import WORKER_ID_TAG, run_task_message
from dagster_taskiq_cancel_tests.jobs import sleepy_job
from dagster_taskiq_cancel_tests.stack import (
    MOTO_ONLY,
    Deployment,
    pid_alive,
    stop_process,
    wait_for,
    worker_pid,
)


@pytest.mark.postgres
def test_twenty_cancels_on_four_workers_stop_the_right_child(deployment: Deployment) -> None:
    """Whoever receives the cancel message, the owner's poll stops the run: 20 of 20."""
    for _ in range(4):
        deployment.start_worker("--concurrency", "5")
    run_ids = [deployment.launch(sleepy_job, seconds=300) for _ in range(20)]
    pids = {run_id: deployment.op_pid(run_id, timeout=180) for run_id in run_ids}
    for run_id in run_ids:
        deployment.wait_status(run_id, {DagsterRunStatus.STARTED})
    holders = {deployment.tags(run_id)[WORKER_ID_TAG] for run_id in run_ids}
    assert len(holders) > 1, "runs should spread over the workers"

    latencies = []
    for index, run_id in enumerate(run_ids):
        started = time.monotonic()
        assert deployment.instance.run_launcher.terminate(run_id)
        wait_for(lambda pid=pids[run_id]: not pid_alive(pid), 15, f"run {run_id} child gone")
        latencies.append(time.monotonic() - started)
        assert all(pid_alive(pids[other]) for other in run_ids[index + 1 :]), "live work was killed"
    for run_id in run_ids:
        deployment.wait_status(run_id, {DagsterRunStatus.CANCELED}, timeout=30)
    print(
        f"\n20 cancels on 4 workers, terminate -> child gone: "
        f"median {statistics.median(latencies):.3f}s max {max(latencies):.3f}s"
    )


@MOTO_ONLY
def test_run_cancelled_while_waiting_in_sqs_is_never_started(deployment: Deployment) -> None:
    forced = deployment.launch(sleepy_job, seconds=60)
    canceling = deployment.launch(sleepy_job, seconds=60)
    # Force-terminate of a STARTING run marks it CANCELED without calling terminate().
    deployment.instance.report_run_canceled(deployment.instance.get_run_by_id(forced))
    deployment.instance.report_run_canceling(deployment.instance.get_run_by_id(canceling))
    deployment.start_worker()
    wait_for(deployment.queue_empty, 30, "both task messages deleted")
    wait_for(lambda: deployment.worker_log(0).count("Skipping task") == 2, 30, "two skips logged")
    for run_id in (forced, canceling):
        assert deployment.executions(run_id) == 0
        assert DagsterRunStatus.STARTED not in {deployment.status(run_id)}


def test_one_slot_workers_share_the_work_instead_of_hoarding(deployment: Deployment) -> None:
    first = deployment.start_worker("--concurrency", "1")
    second = deployment.start_worker("--concurrency", "1")
    run_ids = [deployment.launch(sleepy_job, seconds=2) for _ in range(6)]
    for run_id in run_ids:
        deployment.wait_status(run_id, {DagsterRunStatus.SUCCESS}, timeout=120)
    holders = {deployment.tags(run_id)[WORKER_ID_TAG] for run_id in run_ids}
    assert {worker_pid(h) for h in holders} == {first.pid, second.pid}


@pytest.mark.postgres
def test_redelivered_and_duplicated_run_messages_execute_once(
    tmp_path: Path, sqs_server: LocalSqsServer, storage: dict[str, Any]
) -> None:
    """A duplicated send and an expired visibility timeout both deliver the task again."""
    with Deployment(
        tmp_path, sqs_server.endpoint_url, instance_config=storage, visibility_timeout_seconds=1
    ) as deployment:
        run = deployment.create_run(sleepy_job, seconds=4)
        deployment.instance.launch_run(run.run_id, workspace=None)  # type: ignore[arg-type]
        body = run_task_message(run.run_id).body
        for _ in range(2):
            deployment.queues.send(deployment.queues.names.main, body, run.run_id, "dup")
        deployment.start_worker("--concurrency", "2")
        deployment.start_worker("--concurrency", "2")
        deployment.wait_status(run.run_id, {DagsterRunStatus.SUCCESS}, timeout=120)
        wait_for(deployment.queue_empty, 30, "all three copies deleted")
        assert deployment.executions(run.run_id) == 1


@MOTO_ONLY
def test_worker_exits_on_sigterm_and_leaves_no_child(deployment: Deployment) -> None:
    proc = deployment.start_worker()
    run_id = deployment.launch(sleepy_job, seconds=300)
    pid = deployment.op_pid(run_id)
    stop_process(proc)
    assert proc.returncode == 0
    assert not pid_alive(pid)
