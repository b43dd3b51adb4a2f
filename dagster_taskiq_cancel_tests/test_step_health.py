"""A taskiq_executor run whose step is lost fails the step instead of waiting for it forever:
the step handler's health check answers from the holder's heartbeat and from the claim."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from dagster import DagsterEventType, DagsterRunStatus

from dagster_taskiq_cancel.local_sqs import LocalSqsServer
from dagster_taskiq_cancel_tests.stack import MOTO_ONLY, Deployment, pid_alive, wait_for
from dagster_taskiq_cancel_tests.step_jobs import fan_job, fan_run_config, step_records

pytestmark = MOTO_ONLY

CLAIM_TIMEOUT = 8.0


@pytest.fixture
def short_timeouts(tmp_path: Path, sqs_server: LocalSqsServer) -> Iterator[Deployment]:
    """Heartbeats stale after 3 s and an unclaimed step task lost after ``CLAIM_TIMEOUT``."""
    with Deployment(
        tmp_path,
        sqs_server.endpoint_url,
        heartbeat_timeout_seconds=3,
        step_claim_timeout_seconds=CLAIM_TIMEOUT,
    ) as deployment:
        yield deployment


def _health_failures(deployment: Deployment, run_id: str) -> list[str]:
    """The errors of the run's step failures that the executor's health check reported."""
    errors = [
        entry.dagster_event.step_failure_data.error
        for entry in deployment.instance.all_logs(run_id, of_type=DagsterEventType.STEP_FAILURE)
        if entry.dagster_event is not None
    ]
    return [e.message for e in errors if e is not None and "failed health check" in e.message]


def test_a_step_task_nobody_claims_fails_the_run(short_timeouts: Deployment) -> None:
    deployment = short_timeouts
    # One slot, held by the run task: no worker is free to take the first step's task.
    deployment.start_worker("--concurrency", "1")
    run_id = deployment.launch(fan_job, run_config=fan_run_config(deployment.root, width=1))
    deployment.wait_status(run_id, {DagsterRunStatus.FAILURE}, timeout=120)
    (failure,) = _health_failures(deployment, run_id)
    assert f"never claimed within {CLAIM_TIMEOUT:g}s" in failure, failure
    assert step_records(deployment.markers, run_id) == []
    # The run process exits; the worker then takes the late task and drops it: the run ended.
    wait_for(deployment.queue_empty, 60, "the late step task taken")
    wait_for(lambda: "already ended" in deployment.worker_log(0), 30, "the late task dropped")
    assert step_records(deployment.markers, run_id) == []


def test_a_step_worker_killed_mid_step_fails_the_run_naming_it(short_timeouts: Deployment) -> None:
    deployment = short_timeouts
    deployment.start_worker("--concurrency", "1")
    run_id = deployment.launch(
        fan_job, run_config=fan_run_config(deployment.root, width=1, fan_out_seconds=300)
    )
    deployment.wait_status(run_id, {DagsterRunStatus.STARTED}, timeout=120)
    step_worker = deployment.start_worker("--concurrency", "1")  # the only free slot
    (record,) = wait_for(lambda: step_records(deployment.markers, run_id), 120, "fan_out started")
    assert record.worker_pid == step_worker.pid
    match = re.search(r"worker (\S+) ready", deployment.worker_log(1))
    assert match is not None
    step_worker.kill()
    step_worker.wait()
    wait_for(lambda: not pid_alive(record.pid), 10, "the step process dies with its worker")
    deployment.wait_status(run_id, {DagsterRunStatus.FAILURE}, timeout=60)
    (failure,) = _health_failures(deployment, run_id)
    assert f"worker {match.group(1)} " in failure and "last seen" in failure, failure
