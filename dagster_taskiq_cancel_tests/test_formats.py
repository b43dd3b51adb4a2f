"""Pure unit tests: message validation, queue names, settings from the environment."""

from __future__ import annotations

import json

import dagster as dg
import pytest

from dagster_taskiq_cancel import TaskiqCancelResource, taskiq_executor
from dagster_taskiq_cancel.launcher import TaskiqRunLauncher
from dagster_taskiq_cancel.messages import (
    CancelAck,
    CancelRequest,
    Codec,
    MalformedMessage,
    parse_message,
)
from dagster_taskiq_cancel.queues import QueueNames, endpoint_for
from dagster_taskiq_cancel.settings import SettingsError, TaskiqCancelSettings, settings_from_env
from dagster_taskiq_cancel.tasks import run_task_message, step_task_id


def test_cancel_request_round_trips_with_version() -> None:
    request = CancelRequest(run_id="r1", reason="why", requested_by="me")
    body = json.loads(request.to_json())
    assert body["v"] == 1
    assert parse_message(CancelRequest, request.to_json()) == request


@pytest.mark.parametrize(
    "body",
    [
        "",
        "{",
        "[]",
        '{"v": 2, "run_id": "r"}',
        '{"run_id": 3}',
        '{"v": 1}',
        '{"v": "1", "run_id": "r"}',
        '{"v": 1, "run_id": "r", "grace_seconds": -1}',
        '{"v": 1, "run_id": "' + "x" * 70_000 + '"}',
    ],
)
def test_malformed_cancel_requests_are_rejected(body: str) -> None:
    with pytest.raises(MalformedMessage):
        parse_message(CancelRequest, body)


def test_ack_requires_a_known_outcome() -> None:
    with pytest.raises(MalformedMessage):
        parse_message(CancelAck, '{"v": 1, "run_id": "r", "worker_id": "w", "outcome": "maybe"}')
    ack = parse_message(CancelAck, '{"v": 1, "run_id": "r", "worker_id": "w", "outcome": "killed"}')
    assert ack.outcome == "killed"


@pytest.mark.parametrize(
    ("setting", "names"),
    [
        ("jobs", ("jobs", "jobs-cancels", "jobs-cancel-acks")),
        ("jobs.fifo", ("jobs.fifo", "jobs-cancels.fifo", "jobs-cancel-acks.fifo")),
        (
            "https://sqs.eu-west-1.amazonaws.com/123456789012/jobs",
            ("jobs", "jobs-cancels", "jobs-cancel-acks"),
        ),
    ],
)
def test_queue_names(setting: str, names: tuple[str, str, str]) -> None:
    assert QueueNames.from_setting(setting).all == names


def test_endpoint_from_a_local_queue_url_but_not_from_aws() -> None:
    local = TaskiqCancelSettings(queue_name="http://127.0.0.1:5000/123456789012/jobs")
    assert endpoint_for(local) == "http://127.0.0.1:5000"
    aws = TaskiqCancelSettings(queue_name="https://sqs.eu-west-1.amazonaws.com/1/jobs")
    assert endpoint_for(aws) is None


def test_settings_from_env_then_overrides() -> None:
    env = {
        "DAGSTER_TASKIQ_QUEUE_NAME": "q",
        "DAGSTER_TASKIQ_GRACE_SECONDS": "3",
        "DAGSTER_TASKIQ_SIGNING_KEYS": "k",
    }
    settings = settings_from_env({"grace_seconds": 4, "concurrency": None}, environ=env)
    assert (settings.queue_name, settings.grace_seconds, settings.concurrency) == ("q", 4, 4)
    with pytest.raises(SettingsError, match="DAGSTER_TASKIQ_WAIT_TIME_SECONDS"):
        settings_from_env(environ={"DAGSTER_TASKIQ_WAIT_TIME_SECONDS": "0"})


def test_launcher_config_is_the_settings_fields_all_optional() -> None:
    fields = TaskiqRunLauncher.config_type()
    assert set(fields) == set(TaskiqCancelSettings.model_fields)
    assert not any(field.is_required or field.default_provided for field in fields.values())


def test_task_ids_are_deterministic() -> None:
    assert run_task_message("r").task_id == "r"
    assert step_task_id("r", "s", 2) == "r:s:2"


def test_signed_messages_verify_and_reject_unsigned_forged_and_stale() -> None:
    signer = Codec("s3cret", max_age_seconds=60)
    request = CancelRequest(run_id="r1")
    signed = signer.dumps(request)
    assert "s3cret" not in signed
    assert signer.loads(CancelRequest, signed) == request
    assert Codec().loads(CancelRequest, signed) == request, "without a key: still a hint"
    with pytest.raises(MalformedMessage, match="unsigned"):
        signer.loads(CancelRequest, request.to_json())
    with pytest.raises(MalformedMessage, match="bad signature"):
        Codec("other").loads(CancelRequest, signed)
    envelope = json.loads(signed)
    envelope["signed"] = envelope["signed"].replace("r1", "r2")
    with pytest.raises(MalformedMessage, match="bad signature"):
        signer.loads(CancelRequest, json.dumps(envelope))
    stale = Codec("s3cret", max_age_seconds=0.000001)
    with pytest.raises(MalformedMessage, match="stale"):
        stale.loads(CancelRequest, signed)


@pytest.mark.parametrize("name", ["signing_key", "signing_keys"])
def test_signing_key_is_never_shown(name: str) -> None:
    settings = TaskiqCancelSettings(**{name: "s3cret"})
    assert "s3cret" not in repr(settings)
    assert "s3cret" not in str(settings)


@pytest.mark.parametrize("name", ["signing_key", "signing_keys"])
def test_the_signing_key_is_never_run_config_nor_a_literal_resource_value(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """Run config and literal resource values are shown in the UI and over GraphQL."""
    assert name not in taskiq_executor.config_schema.as_field().config_type.fields
    monkeypatch.setenv(TaskiqCancelSettings.env_var(name), "team-secret")
    resource = TaskiqCancelResource.from_env()
    assert isinstance(getattr(resource, name), dg.EnvVar)
    assert "team-secret" not in repr(dict(resource))  # the field values the UI shows
    assert resource.settings.keyring == ("team-secret",)
