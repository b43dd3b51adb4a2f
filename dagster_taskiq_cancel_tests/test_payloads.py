"""Task bodies over the large-payload threshold travel through S3 (the local server's S3 API)."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import boto3
import pytest
from dagster import DagsterEvent, DagsterEventType, DagsterRunStatus
from taskiq import BrokerMessage

from dagster_taskiq_cancel import claims
from dagster_taskiq_cancel.broker import CancellableSqsBroker
from dagster_taskiq_cancel.local_sqs import LocalSqsServer
from dagster_taskiq_cancel.messages import MalformedMessage
from dagster_taskiq_cancel.payloads import (
    POINTER_CLASS,
    SIZE_ATTRIBUTE,
    PayloadError,
    PayloadPointer,
    check_payload,
    plan_offload,
    read_pointer,
)
from dagster_taskiq_cancel.queues import boto_client_kwargs
from dagster_taskiq_cancel.settings import SettingsError, TaskiqCancelSettings, build_settings
from dagster_taskiq_cancel.tasks import RECEIVED_FROM, run_task_message
from dagster_taskiq_cancel_tests.jobs import sleepy_job
from dagster_taskiq_cancel_tests.stack import MOTO_ONLY, Deployment, main_queue_empty, wait_for
from dagster_taskiq_cancel_tests.step_jobs import fan_job, fan_run_config

BUCKET = "payloads"
# Run and step tasks carry ids only (a few hundred bytes): this sends every one through S3.
LOW = 64


def _settings(**values: Any) -> TaskiqCancelSettings:
    return TaskiqCancelSettings(
        large_payload_bucket=BUCKET, large_payload_threshold_bytes=LOW, **values
    )


def test_the_offloaded_message_is_the_extended_client_format() -> None:
    body = run_task_message("r1").body
    offload = plan_offload(_settings(), "q", body)
    assert offload is not None
    assert offload.payload == body.encode()
    assert offload.attributes == {
        SIZE_ATTRIBUTE: {"DataType": "Number", "StringValue": str(len(body.encode()))}
    }
    name, pointer = json.loads(offload.body)
    assert name == "software.amazon.payloadoffloading.PayloadS3Pointer"
    assert pointer == {"s3BucketName": BUCKET, "s3Key": offload.pointer.key}
    assert offload.pointer.key.startswith("q/")
    # What the consumer reads back is the pointer that was written.
    assert read_pointer(offload.body, offload.attributes, BUCKET) == offload.pointer


def test_small_bodies_stay_in_the_message_and_oversize_needs_a_bucket() -> None:
    body = run_task_message("r1").body
    assert plan_offload(TaskiqCancelSettings(), "q", body) is None
    with pytest.raises(PayloadError, match="DAGSTER_TASKIQ_LARGE_PAYLOAD_BUCKET"):
        plan_offload(TaskiqCancelSettings(large_payload_threshold_bytes=LOW), "q", body)


def test_taskiq_aio_sqs_pointers_are_read() -> None:
    body = json.dumps({"s3_bucket": BUCKET, "s3_key": "r1.json"})
    attributes = {"s3_extended_message": {"DataType": "String", "StringValue": "True"}}
    assert read_pointer(body, attributes, BUCKET) == PayloadPointer(BUCKET, "r1.json")


def _extended(bucket: Any, key: Any = "k", size: str = "10") -> tuple[str, dict[str, Any]]:
    body = json.dumps([POINTER_CLASS, {"s3BucketName": bucket, "s3Key": key}])
    return body, {SIZE_ATTRIBUTE: {"DataType": "Number", "StringValue": size}}


@pytest.mark.parametrize(
    ("body", "attributes", "bucket", "reason"),
    [
        (*_extended("elsewhere"), BUCKET, "not the configured bucket payloads"),
        (*_extended(BUCKET), None, "no large_payload_bucket is configured"),
        (*_extended(BUCKET, key=""), BUCKET, "valid key"),
        (*_extended(BUCKET, key=7), BUCKET, "valid key"),
        (*_extended(["x"]), BUCKET, "valid bucket name"),
        (*_extended("Payloads/../x"), BUCKET, "valid bucket name"),
        (*_extended(BUCKET, key="\ud800"), BUCKET, "valid key"),
        (*_extended(BUCKET, key="k" * 1025), BUCKET, "valid key"),
        (*_extended(BUCKET, size="-1"), BUCKET, "byte count"),
        (*_extended(BUCKET, size="1e9"), BUCKET, "byte count"),
        ("[" * 50_000, {SIZE_ATTRIBUTE: {"StringValue": "1"}}, BUCKET, "not JSON"),
        ('["other.Pointer", {}]', {SIZE_ATTRIBUTE: {"StringValue": "1"}}, BUCKET, "not a"),
        (json.dumps([POINTER_CLASS, []]), {SIZE_ATTRIBUTE: {}}, BUCKET, "not a JSON object"),
        ("[]", {"s3_extended_message": {}}, BUCKET, "not a JSON object"),
        ('{"s3_bucket": "elsewhere", "s3_key": "k"}', {"s3_extended_message": {}}, BUCKET, "not"),
    ],
)
def test_hostile_pointers_are_rejected_before_any_fetch(
    body: str, attributes: dict[str, Any], bucket: str | None, reason: str
) -> None:
    with pytest.raises(MalformedMessage, match=reason):
        read_pointer(body, attributes, bucket)


def test_a_fetched_body_must_match_the_announced_size_and_be_text() -> None:
    pointer = PayloadPointer(BUCKET, "k", 3)
    assert check_payload(pointer, b"abc") == "abc"
    with pytest.raises(MalformedMessage, match="announced 3"):
        check_payload(pointer, b"abcd")
    with pytest.raises(MalformedMessage, match="not UTF-8"):
        check_payload(PayloadPointer(BUCKET, "k"), b"\xff")


@pytest.mark.parametrize("value", [0, 1024 * 1024 + 1])
def test_a_threshold_outside_the_range_is_a_settings_error(value: int) -> None:
    with pytest.raises(SettingsError, match="DAGSTER_TASKIQ_LARGE_PAYLOAD_THRESHOLD_BYTES"):
        build_settings({"large_payload_threshold_bytes": value})


# --- on the real server ------------------------------------------------------------------------


def _bucket(sqs_server: LocalSqsServer) -> tuple[Any, str]:
    """A new versioned bucket: its versions show every body ever written, and deleted."""
    settings = TaskiqCancelSettings(endpoint_url=sqs_server.endpoint_url)
    s3 = boto3.client("s3", **boto_client_kwargs(settings))
    bucket = f"p{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    return s3, bucket


def _current_objects(s3: Any, bucket: str) -> list[str]:
    return [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]


@pytest.fixture
def offloading(tmp_path: Path, sqs_server: LocalSqsServer) -> Any:
    s3, bucket = _bucket(sqs_server)
    with Deployment(
        tmp_path,
        sqs_server.endpoint_url,
        large_payload_bucket=bucket,
        large_payload_threshold_bytes=LOW,
    ) as stack:
        yield stack, s3, bucket


@MOTO_ONLY
def test_a_step_job_whose_tasks_exceed_the_threshold_runs_through_s3(offloading: Any) -> None:
    deployment, s3, bucket = offloading
    run_id = deployment.launch(fan_job, run_config=fan_run_config(deployment.root, width=1))
    queue_url = deployment.queues.url(deployment.queues.names.main)
    # Before any worker: the run task waits in S3, the message holds the pointer.
    [message] = deployment.queues.client.receive_message(
        QueueUrl=queue_url, VisibilityTimeout=0, MessageAttributeNames=["All"]
    )["Messages"]
    assert json.loads(message["Body"])[0] == POINTER_CLASS
    assert int(message["MessageAttributes"][SIZE_ATTRIBUTE]["StringValue"]) > LOW
    assert len(_current_objects(s3, bucket)) == 1

    deployment.start_worker()
    deployment.wait_status(run_id, {DagsterRunStatus.SUCCESS}, timeout=180)
    # Run task plus three steps (fan_out, part[0], total), each written and deleted after its ack.
    wait_for(lambda: not _current_objects(s3, bucket), 30, "every body deleted")
    versions = s3.list_object_versions(Bucket=bucket)
    assert len(versions["Versions"]) == 4
    assert len(versions["DeleteMarkers"]) == 4
    assert main_queue_empty(deployment)


def _starting_run(deployment: Deployment) -> str:
    """A run in STARTING whose run task a test sends itself."""
    run = deployment.create_run(sleepy_job)
    event = DagsterEvent(DagsterEventType.RUN_STARTING.value, job_name=run.job_name)
    deployment.instance.report_dagster_event(event, run.run_id)
    claims.record_sent(deployment.instance, run.run_id, run.run_id)
    return run.run_id


@MOTO_ONLY
def test_hostile_pointers_are_set_aside_and_taskiq_aio_sqs_bodies_run(
    offloading: Any, sqs_server: LocalSqsServer
) -> None:
    deployment, s3, bucket = offloading
    other_s3, other = _bucket(sqs_server)
    worker = deployment.start_worker()
    queue_url = deployment.queues.url(deployment.queues.names.main)

    def send(body: str, attributes: dict[str, Any]) -> None:
        deployment.queues.client.send_message(
            QueueUrl=queue_url, MessageBody=body, MessageAttributes=attributes
        )

    # A valid task in a bucket that is not ours: never fetched, so never run.
    foreign = _starting_run(deployment)
    other_s3.put_object(Bucket=other, Key="task", Body=run_task_message(foreign).body)
    send(*_extended(other, "task"))
    # A pointer to nothing in our bucket, and a pointer that is not one.
    send(*_extended(bucket, f"{uuid.uuid4()}"))
    send("{}", {SIZE_ATTRIBUTE: {"DataType": "Number", "StringValue": "2"}})
    send(*_extended(bucket, "\ud800"))  # a key no S3 request can carry
    # taskiq-aio-sqs's own format, which the worker reads too.
    theirs = _starting_run(deployment)
    s3.put_object(Bucket=bucket, Key=f"{theirs}.json", Body=run_task_message(theirs).body)
    send(
        json.dumps({"s3_bucket": bucket, "s3_key": f"{theirs}.json"}),
        {"s3_extended_message": {"DataType": "String", "StringValue": "True"}},
    )

    deployment.wait_status(theirs, {DagsterRunStatus.SUCCESS}, timeout=120)
    wait_for(lambda: main_queue_empty(deployment), 30, "every message taken")
    log = deployment.worker_log(0)
    assert f"points to s3://{other}/task, not the configured bucket {bucket}" in log
    assert "does not exist (already run and deleted, or never written)" in log
    assert f"not a {POINTER_CLASS} body" in log
    assert "S3 pointer without a valid key" in log
    assert worker.poll() is None
    assert deployment.status(foreign) == DagsterRunStatus.STARTING
    assert _current_objects(other_s3, other) == ["task"]
    wait_for(lambda: not _current_objects(s3, bucket), 30, "their body deleted after its ack")


@MOTO_ONLY
def test_a_missing_bucket_fails_the_worker_at_start_up(
    tmp_path: Path, sqs_server: LocalSqsServer
) -> None:
    with Deployment(
        tmp_path, sqs_server.endpoint_url, large_payload_bucket=f"n{uuid.uuid4().hex[:12]}"
    ) as deployment:
        with pytest.raises(AssertionError, match="large_payload_bucket n"):
            deployment.start_worker()
        assert "Traceback" not in deployment.worker_log(0)


@MOTO_ONLY
def test_an_oversize_task_with_no_bucket_fails_its_run_at_send(
    tmp_path: Path, sqs_server: LocalSqsServer
) -> None:
    with Deployment(
        tmp_path, sqs_server.endpoint_url, large_payload_threshold_bytes=LOW
    ) as deployment:
        run = deployment.create_run(sleepy_job)
        with pytest.raises(PayloadError, match="no large_payload_bucket is set"):
            deployment.instance.launch_run(run.run_id, workspace=None)  # type: ignore[arg-type]
        assert deployment.status(run.run_id) == DagsterRunStatus.FAILURE
        assert any(
            "DAGSTER_TASKIQ_LARGE_PAYLOAD_BUCKET" in m
            for m in deployment.engine_messages(run.run_id)
        )
        assert main_queue_empty(deployment)


@MOTO_ONLY
def test_the_async_broker_sends_and_reads_back_through_s3(offloading: Any) -> None:
    """The worker side (kick, listen, ack) in one process, on the real server."""
    deployment, s3, bucket = offloading
    task = run_task_message("r-async")

    async def round_trip() -> tuple[bytes, list[str], list[str]]:
        broker = CancellableSqsBroker(deployment.settings)
        await broker.startup()
        try:
            message = task.body.encode()
            await broker.kick(
                BrokerMessage(task_id=task.task_id, task_name="t", message=message, labels={})
            )
            stored = _current_objects(s3, bucket)
            received = await anext(broker.listen())
            await received.ack()
            return received.data, stored, _current_objects(s3, bucket)
        finally:
            await broker.shutdown()

    data, stored, after_ack = asyncio.run(round_trip())
    sent = json.loads(task.body)
    sent["labels"][RECEIVED_FROM] = deployment.queues.names.main  # the broker's note on receipt
    assert json.loads(data) == sent
    assert len(stored) == 1
    assert after_ack == []
