"""Safe defaults, in-process: a key is required off this machine, keys rotate, times are finite."""

from __future__ import annotations

import math

import dagster as dg
import pytest
from dagster._core.errors import DagsterResourceFunctionError

from dagster_taskiq_cancel import TaskiqCancelResource
from dagster_taskiq_cancel.messages import (
    CancelAck,
    CancelRequest,
    Codec,
    MalformedMessage,
    codec_for,
)
from dagster_taskiq_cancel.settings import (
    KEY_WITHHELD_ENV,
    SettingsError,
    TaskiqCancelSettings,
    settings_from_env,
)
from dagster_taskiq_cancel.tasks import TAG_PREFIX
from dagster_taskiq_cancel.timing import stop_seconds

ENDPOINT = "DAGSTER_TASKIQ_ENDPOINT_URL"
KEYS = "DAGSTER_TASKIQ_SIGNING_KEYS"
REMOTE = [None, "https://sqs.eu-west-1.amazonaws.com", "http://10.0.0.5:9324", "http://sqs:9324"]
LOCAL = ["http://127.0.0.1:5000", "http://localhost:4566", "http://[::1]:4566"]


def _env(endpoint: str | None, **more: str) -> dict[str, str]:
    return {**({ENDPOINT: endpoint} if endpoint else {}), **more}


@pytest.mark.parametrize("endpoint", REMOTE)
def test_an_endpoint_off_this_machine_needs_a_key(endpoint: str | None) -> None:
    with pytest.raises(SettingsError) as raised:
        settings_from_env(environ=_env(endpoint))
    (line,) = str(raised.value).splitlines()
    for text in [endpoint or "AWS", KEYS, "allow_unsigned: true"]:
        assert text in line, line
    assert settings_from_env(environ=_env(endpoint, **{KEYS: "k"})).keyring == ("k",)
    allowed = settings_from_env(environ=_env(endpoint, DAGSTER_TASKIQ_ALLOW_UNSIGNED="true"))
    assert allowed.keyring == ()
    withheld = settings_from_env(environ=_env(endpoint, **{KEYS: "", KEY_WITHHELD_ENV: "1"}))
    assert withheld.keyring == (), "a worker's child it gave no key still loads its settings"


@pytest.mark.parametrize("endpoint", LOCAL)
def test_an_endpoint_on_this_machine_runs_unsigned(endpoint: str) -> None:
    assert settings_from_env(environ=_env(endpoint)).keyring == ()


def test_the_endpoint_of_a_queue_url_counts() -> None:
    local = {"DAGSTER_TASKIQ_QUEUE_NAME": "http://localhost:4566/000000000000/q"}
    assert settings_from_env(environ=local).keyring == ()
    aws = {"DAGSTER_TASKIQ_QUEUE_NAME": "https://sqs.eu-west-1.amazonaws.com/123456789012/q"}
    with pytest.raises(SettingsError, match="endpoint AWS"):
        settings_from_env(environ=aws)


def test_the_resource_needs_the_key_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in (ENDPOINT, KEYS, "DAGSTER_TASKIQ_SIGNING_KEY", "DAGSTER_HOME"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SettingsError, match=KEYS):
        _ = TaskiqCancelResource().settings  # a script
    instance = dg.DagsterInstance.ephemeral()
    resources = {"taskiq": TaskiqCancelResource()}
    with (
        pytest.raises(DagsterResourceFunctionError) as raised,
        dg.build_resources(resources, instance),
    ):
        pass  # a sensor, a run
    assert KEYS in str(raised.value.__cause__)
    assert TaskiqCancelResource(allow_unsigned=True).settings.keyring == ()


def test_keys_rotate_the_first_signs_any_verifies() -> None:
    request, ack = CancelRequest(run_id="r"), CancelAck(run_id="r", worker_id="w", outcome="killed")
    old, both, new = Codec("old"), Codec("new", "old"), Codec("new")
    for message in (request, ack):
        kind = type(message)
        by_old = old.dumps(message)
        assert both.loads(kind, by_old) == message, "the old key verifies while both are set"
        with pytest.raises(MalformedMessage, match="bad signature"):
            new.loads(kind, by_old)
        assert new.loads(kind, both.dumps(message)) == message, "both sign with the first key"
        with pytest.raises(MalformedMessage, match="bad signature"):
            old.loads(kind, both.dumps(message))
    task_mac = old.mac("task")
    assert both.mac_error("task", task_mac) is None
    assert new.mac_error("task", task_mac) == "bad task signature"
    assert both.mac("task") == new.mac("task")


def test_the_key_settings_forms() -> None:
    rotating = settings_from_env(environ={KEYS: "new, old"})
    assert rotating.keyring == ("new", "old")
    assert codec_for(rotating).mac("x") == Codec("new").mac("x")
    single = settings_from_env(environ={"DAGSTER_TASKIQ_SIGNING_KEY": "only"})
    assert single.keyring == ("only",), "the single-key setting still works"
    for environ, named in [
        ({KEYS: "a", "DAGSTER_TASKIQ_SIGNING_KEY": "b"}, "both set"),
        ({KEYS: "a,,b"}, "empty key"),
        ({KEYS: "a,"}, "empty key"),
    ]:
        with pytest.raises(SettingsError, match=named):
            settings_from_env(environ=environ)
    assert "new" not in repr(rotating)


FLOAT_FIELDS = [
    name
    for name, field in TaskiqCancelSettings.model_fields.items()
    if field.annotation in (float, float | None)
]


@pytest.mark.parametrize("name", FLOAT_FIELDS)
@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e309", math.inf, math.nan])
def test_no_setting_is_infinite_or_nan(name: str, value: str | float) -> None:
    with pytest.raises(SettingsError) as raised:
        settings_from_env({name: value}, environ={KEYS: "k"})
    assert f"{name}=" in str(raised.value)
    assert TaskiqCancelSettings.env_var(name) in str(raised.value)
    with pytest.raises(SettingsError, match=name):
        settings_from_env(environ={KEYS: "k", TaskiqCancelSettings.env_var(name): str(value)})


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e309", "abc"])
def test_stop_time_tags_that_are_not_finite_fall_back_to_the_settings(value: str) -> None:
    settings = TaskiqCancelSettings(notice_seconds=1, grace_seconds=2)
    tags = {f"{TAG_PREFIX}notice_seconds": value, f"{TAG_PREFIX}grace_seconds": value}
    assert stop_seconds(tags, settings) == 3
