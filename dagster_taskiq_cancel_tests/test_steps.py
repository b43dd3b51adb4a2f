"""Steps run as their own taskiq tasks on several workers, and stop when their run does."""

from __future__ import annotations

import json
import os
import pickle
import signal
import time
import uuid
from pathlib import Path

import boto3
import pytest
from dagster import DagsterRunStatus

from dagster_taskiq_cancel.local_sqs import LocalSqsServer
from dagster_taskiq_cancel.messages import STOPPED_OUTCOMES, CancelAck, parse_message
from dagster_taskiq_cancel.queues import boto_client_kwargs
from dagster_taskiq_cancel.tasks import EXECUTE_STEP, TASK_ID_TAG, step_task_id
from dagster_taskiq_cancel_tests.stack import (
    MOTO_ONLY,
    Deployment,
    monitor_until,
    pid_alive,
    task_pids,
    wait_for,
)
from dagster_taskiq_cancel_tests.step_jobs import (
    StepRecord,
    fan_job,
    fan_run_config,
    s3_fan_job,
    step_records,
)

# Step processes are full Dagster processes: on this 2-core machine each needs seconds to start.
RUN_TIMEOUT = 180


def _launch(deployment: Deployment, **markers: object) -> str:
    return deployment.launch(fan_job, run_config=fan_run_config(deployment.root, **markers))


def _running_parts(deployment: Deployment, run_id: str, count: int) -> list[StepRecord]:
    def parts() -> list[StepRecord]:
        found = [
            r for r in step_records(deployment.markers, run_id) if r.step_key.startswith("part")
        ]
        return found if len(found) == count else []

    return wait_for(parts, RUN_TIMEOUT, f"{count} running steps")


def _stop_deadline(deployment: Deployment) -> float:
    """Grace plus one poll interval, with slack for a busy 2-core machine."""
    return deployment.settings.grace_seconds + deployment.settings.poll_interval_seconds + 15


def _wait_gone(pids: list[int], timeout: float) -> None:
    wait_for(lambda: not any(pid_alive(p) for p in pids), timeout, f"step processes {pids} gone")


def _step_acks(deployment: Deployment, run_id: str, step_keys: set[str]) -> dict[str, CancelAck]:
    """Read the acks queue until every step in ``step_keys`` reported that it stopped."""
    acks: dict[str, CancelAck] = {}
    url = deployment.queues.url(deployment.queues.names.acks)

    def receive() -> bool:
        response = deployment.queues.call(
            "receive_message", QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1
        )
        for message in response.get("Messages", []):
            ack = parse_message(CancelAck, message["Body"])
            if ack.run_id == run_id and ack.step_key and ack.outcome in STOPPED_OUTCOMES:
                acks[ack.step_key] = ack
        return step_keys <= acks.keys()

    wait_for(receive, 60, f"acks for {sorted(step_keys)}")
    return acks


@MOTO_ONLY
def test_parallel_steps_run_on_several_workers(deployment: Deployment) -> None:
    workers = {deployment.start_worker("--concurrency", "2").pid for _ in range(3)}
    run_id = _launch(deployment, width=6)
    deployment.wait_status(run_id, {DagsterRunStatus.SUCCESS}, timeout=RUN_TIMEOUT)
    records = step_records(deployment.markers, run_id)
    parts = [f"part[{i}]" for i in range(6)]
    assert sorted(r.step_key for r in records) == sorted(["fan_out", "total", *parts])
    step_workers = {r.worker_pid for r in records}
    assert step_workers <= workers
    assert len(step_workers) > 1, records
    result = deployment.root / "io" / run_id / "total" / "result"
    assert pickle.loads(result.read_bytes()) == sum(10 * i for i in range(6))
    wait_for(deployment.queue_empty, 30, "queues empty")


@MOTO_ONLY
def test_a_failed_step_is_retried_as_a_new_task(deployment: Deployment) -> None:
    deployment.start_worker("--concurrency", "3")
    run_id = _launch(deployment, width=1, fail_first_attempt=True)
    deployment.wait_status(run_id, {DagsterRunStatus.SUCCESS}, timeout=RUN_TIMEOUT)
    attempts = [
        r.attempt for r in step_records(deployment.markers, run_id) if r.step_key == "part[0]"
    ]
    assert attempts == [0, 1]
    messages = deployment.engine_messages(run_id)
    for attempt in (0, 1):
        assert any(f"as task {step_task_id(run_id, 'part[0]', attempt)}" in m for m in messages)


@MOTO_ONLY
def test_terminate_stops_every_step_on_every_worker(deployment: Deployment) -> None:
    for _ in range(3):
        deployment.start_worker("--concurrency", "2")
    run_id = _launch(deployment, width=4, seconds=600)
    parts = _running_parts(deployment, run_id, 4)
    # Five slots left after the run task: four steps cannot all fit on one worker.
    assert len({r.worker_pid for r in parts}) > 1
    started = time.monotonic()
    assert deployment.instance.run_launcher.terminate(run_id)
    _wait_gone([r.pid for r in parts], _stop_deadline(deployment))
    print(f"terminate -> last of 4 step processes gone: {time.monotonic() - started:.3f}s")
    deployment.wait_status(run_id, {DagsterRunStatus.CANCELED}, timeout=60)
    acks = _step_acks(deployment, run_id, {r.step_key for r in parts})
    for record in parts:
        assert acks[record.step_key].task_id == step_task_id(run_id, record.step_key, 0)
    wait_for(deployment.queue_empty, 30, "queues empty")
    assert all(r.attempt == 0 for r in step_records(deployment.markers, run_id)), (
        "a step was retried"
    )
    # The parts have a RetryPolicy: a cancel must not put them up for retry, nor send attempts.
    events = deployment.instance.all_logs(run_id)
    assert not [e for e in events if e.dagster_event and e.dagster_event.is_step_up_for_retry]
    assert not [
        m for m in deployment.engine_messages(run_id) if f"{run_id}:part" in m and m.endswith(":1.")
    ]


@MOTO_ONLY
def test_terminate_stops_every_step_of_a_run_that_could_resume(
    tmp_path: Path, sqs_server: LocalSqsServer
) -> None:
    """With resume on, Dagster's executor does not forward the interrupt to its steps (dagster
    issues 21476, 33923): the workers holding them stop them from the run storage; and run
    monitoring never resumes the cancelled run."""
    monitoring = {"enabled": True, "max_resume_run_attempts": 3, "poll_interval_seconds": 1}
    with Deployment(
        tmp_path, sqs_server.endpoint_url, instance_config={"run_monitoring": monitoring}
    ) as deployment:
        for _ in range(2):
            deployment.start_worker("--concurrency", "2")
        run_id = _launch(deployment, width=2, seconds=600)
        parts = _running_parts(deployment, run_id, 2)
        started = time.monotonic()
        assert deployment.instance.run_launcher.terminate(run_id)
        _wait_gone([r.pid for r in parts], _stop_deadline(deployment))
        print(f"terminate -> last of 2 step processes gone: {time.monotonic() - started:.3f}s")
        deployment.wait_status(run_id, {DagsterRunStatus.CANCELED}, timeout=60)
        messages = deployment.engine_messages(run_id)
        assert any("not forwarding to steps because run will be resumed" in m for m in messages)
        monitor_until(deployment, deployment.queue_empty, 30, "queues empty, monitoring on")
        assert not any("Resuming run" in m for m in deployment.engine_messages(run_id))
        assert deployment.tags(run_id)[TASK_ID_TAG] == run_id, "no resume task was sent"
        assert deployment.status(run_id) == DagsterRunStatus.CANCELED
        assert all(r.attempt == 0 for r in step_records(deployment.markers, run_id))


@MOTO_ONLY
def test_steps_of_a_dead_run_process_stop_once_the_run_fails(deployment: Deployment) -> None:
    workers = [deployment.start_worker("--concurrency", "2") for _ in range(2)]
    run_id = _launch(deployment, width=2, seconds=600)
    parts = _running_parts(deployment, run_id, 2)
    run_pids = [pid for w in workers for pid in task_pids(w.pid, "execute_run")]
    assert len(run_pids) == 1, run_pids
    os.kill(run_pids[0], signal.SIGKILL)
    _wait_gone(run_pids, 10)
    assert all(pid_alive(r.pid) for r in parts), (
        "orphaned steps should still run until the run fails"
    )
    run = deployment.instance.get_run_by_id(run_id)
    assert run is not None
    deployment.instance.report_run_failed(run)
    _wait_gone([r.pid for r in parts], _stop_deadline(deployment))


def test_a_redelivered_step_message_does_not_run_the_step_twice(deployment: Deployment) -> None:
    # One slot, held by the run task: the first step's message waits in the queue for the test.
    deployment.start_worker("--concurrency", "1")
    run_id = _launch(deployment, width=1, fan_out_seconds=4)
    url = deployment.queues.url(deployment.queues.names.main)

    def receive() -> list[dict[str, str]]:
        response = deployment.queues.call(
            "receive_message", QueueUrl=url, MaxNumberOfMessages=1, WaitTimeSeconds=1
        )
        messages = response.get("Messages", [])
        if messages and json.loads(messages[0]["Body"])["task_name"] != EXECUTE_STEP:
            # The run task, taken before the worker's long poll saw it: hand it back at once.
            receipt = messages[0]["ReceiptHandle"]
            deployment.queues.call(
                "change_message_visibility",
                QueueUrl=url,
                ReceiptHandle=receipt,
                VisibilityTimeout=0,
            )
            return []
        return messages

    (message,) = wait_for(receive, RUN_TIMEOUT, "the fan_out step message")
    deployment.queues.call("delete_message", QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
    deployment.start_worker("--concurrency", "1")
    deployment.start_worker("--concurrency", "1")
    name = deployment.queues.names.main
    deployment.queues.send(name, message["Body"], group_id="fan_out", dedup_id="first")
    wait_for(lambda: step_records(deployment.markers, run_id), RUN_TIMEOUT, "fan_out started")
    # While the first copy runs, only the third worker has a free slot: it gets the duplicate.
    deployment.queues.send(name, message["Body"], group_id="fan_out", dedup_id="second")
    deployment.wait_status(run_id, {DagsterRunStatus.SUCCESS}, timeout=RUN_TIMEOUT)
    executed = [r.step_key for r in step_records(deployment.markers, run_id)]
    assert executed.count("fan_out") == 1, executed
    logs = "".join(deployment.worker_log(i) for i in range(3))
    assert f"{run_id}:fan_out:0: another worker claimed it" in logs  # the step's claim


@MOTO_ONLY
def test_step_outputs_pass_through_s3_on_the_local_server(
    deployment: Deployment, sqs_server: LocalSqsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = f"b{uuid.uuid4().hex[:12]}"
    s3 = boto3.client("s3", **boto_client_kwargs(deployment.settings))
    s3.create_bucket(Bucket=bucket)
    s3_env = {"TEST_S3_ENDPOINT": sqs_server.endpoint_url, "TEST_S3_BUCKET": bucket}
    deployment.env.update(s3_env)
    for name, value in s3_env.items():
        monkeypatch.setenv(name, value)  # the run's config is checked here too, at creation
    for _ in range(2):
        deployment.start_worker("--concurrency", "2")
    markers = {"marker_dir": str(deployment.markers), "width": 3}
    run_id = deployment.launch(
        s3_fan_job, run_config={"resources": {"markers": {"config": markers}}}
    )
    deployment.wait_status(run_id, {DagsterRunStatus.SUCCESS}, timeout=RUN_TIMEOUT)
    key = f"dagster/storage/{run_id}/total/result"
    assert pickle.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read()) == 30
    assert len({r.worker_pid for r in step_records(deployment.markers, run_id)}) > 1
