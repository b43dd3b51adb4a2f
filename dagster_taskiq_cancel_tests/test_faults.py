"""Worker crash, run process crash, SQS outage and a deploy's SIGTERM: nothing lost or stuck."""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

from dagster import DagsterRunStatus, RunsFilter
from dagster._daemon.monitoring.run_monitoring import monitor_started_run

from dagster_taskiq_cancel.local_sqs import LocalSqsServer, MotoServer
from dagster_taskiq_cancel_tests.jobs import sleepy_job
from dagster_taskiq_cancel_tests.stack import (
    MOTO_ONLY,
    Deployment,
    pid_alive,
    stop_process,
    wait_for,
)


def monitor(deployment: Deployment, run_id: str) -> bool:
    """One pass of Dagster's run monitoring over the run; True once it is FAILURE."""
    (record,) = deployment.instance.get_run_records(RunsFilter(run_ids=[run_id]))
    if record.dagster_run.status == DagsterRunStatus.STARTED:
        monitor_started_run(deployment.instance, None, record, logging.getLogger("monitor"))  # type: ignore[arg-type]
    return deployment.status(run_id) == DagsterRunStatus.FAILURE


@MOTO_ONLY
def test_killed_worker_fails_the_run_through_run_monitoring_and_nothing_runs_twice(
    tmp_path: Path, sqs_server: LocalSqsServer
) -> None:
    with Deployment(tmp_path, sqs_server.endpoint_url, heartbeat_timeout_seconds=3) as deployment:
        worker = deployment.start_worker()
        run_id = deployment.launch(sleepy_job, seconds=300)
        pid = deployment.op_pid(run_id)
        deployment.wait_status(run_id, {DagsterRunStatus.STARTED})
        assert monitor(deployment, run_id) is False, "a live worker's run is healthy"
        worker.kill()
        worker.wait()
        wait_for(lambda: not pid_alive(pid), 10, "the run process dies with its worker")
        started = time.monotonic()
        wait_for(lambda: monitor(deployment, run_id), 30, "run monitoring fails the run")
        print(
            f"\nworker SIGKILL -> run FAILURE by run monitoring: {time.monotonic() - started:.1f}s"
        )
        assert any("last seen" in m for m in deployment.engine_messages(run_id))
        deployment.start_worker()
        wait_for(deployment.queue_empty, 30, "queues empty")
        assert deployment.executions(run_id) == 1


@MOTO_ONLY
def test_run_process_that_dies_fails_the_run(deployment: Deployment) -> None:
    deployment.start_worker()
    run_id = deployment.launch(sleepy_job, seconds=300)
    pid = deployment.op_pid(run_id)
    deployment.wait_status(run_id, {DagsterRunStatus.STARTED})
    os.kill(pid, signal.SIGKILL)
    deployment.wait_status(run_id, {DagsterRunStatus.FAILURE}, timeout=30)
    assert any("exited with code -9" in m for m in deployment.engine_messages(run_id))


@MOTO_ONLY
def test_sigterm_drains_then_stops_and_says_so(deployment: Deployment) -> None:
    worker = deployment.start_worker()
    run_id = deployment.launch(sleepy_job, seconds=300)
    pid = deployment.op_pid(run_id)
    deployment.wait_status(run_id, {DagsterRunStatus.STARTED})
    stop_process(worker)
    assert worker.returncode == 0
    assert not pid_alive(pid)
    assert any("shutting down" in m for m in deployment.engine_messages(run_id))
    deployment.wait_status(run_id, {DagsterRunStatus.FAILURE}, timeout=30)


def test_sqs_outage_workers_back_off_log_once_and_resume(tmp_path: Path) -> None:
    server = MotoServer().start()
    with Deployment(tmp_path, server.endpoint_url) as deployment:
        worker = deployment.start_worker()
        run_id = deployment.launch(sleepy_job, seconds=300)
        pid = deployment.op_pid(run_id)
        deployment.wait_status(run_id, {DagsterRunStatus.STARTED})
        server.stop()
        assert deployment.instance.run_launcher.terminate(run_id), "intent recorded while down"
        wait_for(lambda: not pid_alive(pid), 15, "the poll stops the run while SQS is down")
        deployment.wait_status(run_id, {DagsterRunStatus.CANCELED}, timeout=30)
        assert any("not sent" in m for m in deployment.engine_messages(run_id))
        # The outage itself: long enough for five failed receives of each loop (0.5 s backoff,
        # doubling), each of which must not log again.
        outage_ends = time.monotonic() + 12
        wait_for(lambda: time.monotonic() > outage_ends, 20, "a 12 s outage")
        assert worker.poll() is None, "the worker survives the outage"
        server.start()  # same port, fresh state: the queues are re-created
        deployment.queues.create_all()
        again = deployment.launch(sleepy_job)
        deployment.wait_status(again, {DagsterRunStatus.SUCCESS}, timeout=90)
        log = deployment.worker_log(0)
        assert log.count("SQS receive failed") <= 2, "one line per outage per queue loop"
        assert "SQS answers again" in log
        server.stop()


def test_sigterm_hands_prefetched_tasks_back_at_once(deployment: Deployment) -> None:
    worker = deployment.start_worker("--concurrency", "1", "--prefetch", "2")
    first = deployment.launch(sleepy_job, seconds=300)
    deployment.op_pid(first)
    waiting = [deployment.launch(sleepy_job, seconds=0.1) for _ in range(2)]
    main = deployment.queues.names.main
    wait_for(lambda: deployment.queues.depths()[main]["in_flight"] == 2, 30, "two prefetched")
    stop_process(worker)
    # Visible again long before the 60 s visibility timeout, and never started by this worker.
    wait_for(lambda: deployment.queues.depths()[main]["visible"] == 2, 15, "handed back")
    assert all(deployment.executions(run_id) == 0 for run_id in waiting)
    deployment.start_worker()
    for run_id in waiting:
        deployment.wait_status(run_id, {DagsterRunStatus.SUCCESS}, timeout=90)
