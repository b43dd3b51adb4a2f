"""Bad input on every queue: the parsers never raise anything but their own rejection, and a real
worker and sensor log each bad message with its SQS message id, delete it, and keep working."""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from dagster import DagsterRunStatus
from hypothesis import given, settings
from hypothesis import strategies as st

from dagster_taskiq_cancel.broker import CancellableSqsBroker
from dagster_taskiq_cancel.messages import (
    CancelAck,
    CancelRequest,
    Codec,
    MalformedMessage,
    parse_message,
)
from dagster_taskiq_cancel.sensor import ACK_BATCH, TickSummary, _handle_batch, _receive
from dagster_taskiq_cancel.settings import TaskiqCancelSettings
from dagster_taskiq_cancel.tasks import (
    EXECUTE_RUN,
    TASK_KWARGS,
    TASK_NAMES,
    resume_task_message,
    run_task_message,
    step_task_message,
)
from dagster_taskiq_cancel_tests.jobs import sleepy_job
from dagster_taskiq_cancel_tests.stack import MOTO_ONLY, Deployment, pid_alive, wait_for
from dagster_taskiq_cancel_tests.test_sensor import (
    acks_queue_empty,
    count,
    set_canceling,
    tick_until,
)

PROPERTY = settings(max_examples=300, deadline=None, database=None)
# Between the 64 KiB our messages may have and the 256 KiB SQS lets through.
OVERSIZED_PAD = "x" * (100 * 1024)
HEX_MAC = "0" * 64
# Bodies under 64 KiB that once raised past the parsers (RecursionError, OverflowError,
# UnicodeEncodeError, TypeError) and silenced the loop reading them. All are plain text that
# SQS carries; invalid UTF-8 it cannot carry, so that one is tested on the parsers only.
PATHOLOGICAL = {
    "deeply nested": "[" * 60_000,
    "deeply nested object": '{"a": ' * 10_000,
    "deep inside a message": '{"v": 1, "run_id": "r", "x": ' + "[" * 30_000 + "]" * 30_000 + "}",
    "huge number": '{"v": 1, "run_id": "r", "requested_at": 1' + "0" * 5_000 + "}",
    "deep inside an envelope": json.dumps({"signed": "[" * 30_000, "ts": 1.0, "mac": HEX_MAC}),
    "huge envelope ts": '{"signed": "{}", "ts": 1' + "0" * 400 + f', "mac": "{HEX_MAC}"}}',
    "lone surrogate in an envelope": f'{{"signed": "\\ud800", "ts": 1, "mac": "{HEX_MAC}"}}',
    "non-ASCII mac": '{"signed": "{}", "ts": 1, "mac": "\\u00e9"}',
}

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)
# Values a real sender might put in a field, so that many generated bodies are nearly valid.
PLAUSIBLE = st.sampled_from(
    [1, 2, 0, -1, 1.5, 1e308, math.nan, math.inf, "", "r", "killed", None, True, [], {}]
)
FIELD_VALUES = JSON_VALUES | PLAUSIBLE


def _dumps(value: Any) -> str:
    """JSON as a careless sender writes it: NaN and Infinity included."""
    return json.dumps(value)


def _field_dicts(names: list[str]) -> st.SearchStrategy[str]:
    """JSON objects with any subset of ``names``, each of a random type."""
    return st.fixed_dictionaries({}, optional=dict.fromkeys(names, FIELD_VALUES)).map(_dumps)


def _near_misses(valid: dict[str, Any]) -> st.SearchStrategy[str | bytes]:
    """A valid message with a few fields replaced by random values or dropped."""
    changes = st.dictionaries(st.sampled_from(sorted(valid)), FIELD_VALUES, min_size=1, max_size=2)
    dropped = st.sets(st.sampled_from(sorted(valid)), max_size=1)
    return st.builds(
        lambda c, d: _dumps({k: v for k, v in {**valid, **c}.items() if k not in d}),
        changes,
        dropped,
    )


def _bodies(valid: dict[str, Any]) -> st.SearchStrategy[str | bytes]:
    return st.one_of(st.text(), st.binary(), JSON_VALUES.map(_dumps), _field_dicts(sorted(valid)))


def _valid(kind: type[CancelRequest] | type[CancelAck]) -> dict[str, Any]:
    """A fixed valid message of ``kind``, as a JSON object."""
    fields = {"run_id": "r", "worker_id": "w", "outcome": "killed", "step_key": "s"}
    return json.loads(kind.model_validate(fields).to_json())


@pytest.mark.parametrize("kind", [CancelRequest, CancelAck])
@pytest.mark.parametrize("bodies", [_bodies, _near_misses], ids=["random", "near-miss"])
@PROPERTY
@given(data=st.data())
def test_parser_returns_a_valid_model_or_raises_malformed(
    kind: type[CancelRequest] | type[CancelAck],
    bodies: Callable[[dict[str, Any]], st.SearchStrategy[str | bytes]],
    data: st.DataObject,
) -> None:
    body = data.draw(bodies(_valid(kind)))
    try:
        message = parse_message(kind, body)
    except MalformedMessage as exc:
        assert str(exc)
        return
    assert isinstance(message, kind)
    assert parse_message(kind, message.to_json()) == message, "what we accept, we can resend"


CODECS = [Codec(), Codec("team-secret")]
ENVELOPES = st.fixed_dictionaries(
    {},
    optional={
        "signed": FIELD_VALUES | _near_misses(_valid(CancelRequest)),
        "ts": FIELD_VALUES,
        "mac": FIELD_VALUES | st.just(HEX_MAC),
    },
).map(_dumps)


@pytest.mark.parametrize("codec", CODECS, ids=["unkeyed", "keyed"])
@pytest.mark.parametrize("kind", [CancelRequest, CancelAck])
@pytest.mark.parametrize(
    "body",
    [*PATHOLOGICAL.values(), b"\xff\xfe{", b'{"v": 1, "run_id": "\xc3"}'],
    ids=[*PATHOLOGICAL, "invalid utf-8", "invalid utf-8 in a field"],
)
def test_pathological_bodies_are_malformed_not_errors(
    codec: Codec, kind: type[CancelRequest] | type[CancelAck], body: str | bytes
) -> None:
    with pytest.raises(MalformedMessage):
        codec.loads(kind, body)


@pytest.mark.parametrize("kind", [CancelRequest, CancelAck])
@pytest.mark.parametrize("inner", [PATHOLOGICAL["deeply nested"], "\ud800", "[1e999]"])
def test_validly_signed_garbage_is_malformed(
    kind: type[CancelRequest] | type[CancelAck], inner: str
) -> None:
    codec = Codec("team-secret")
    with pytest.raises(MalformedMessage):
        codec.loads(kind, codec.seal(inner))


@pytest.mark.parametrize("codec", CODECS, ids=["unkeyed", "keyed"])
@pytest.mark.parametrize("kind", [CancelRequest, CancelAck])
@PROPERTY
@given(data=st.data())
def test_codec_returns_a_valid_model_or_raises_malformed(
    codec: Codec, kind: type[CancelRequest] | type[CancelAck], data: st.DataObject
) -> None:
    body = data.draw(st.one_of(_bodies(_valid(kind)), ENVELOPES))
    try:
        message = codec.loads(kind, body)
    except MalformedMessage as exc:
        assert str(exc)
        return
    assert isinstance(message, kind)


BROKER = CancellableSqsBroker(TaskiqCancelSettings(queue_name="property"))
TASK_DICTS = st.fixed_dictionaries(
    {},
    optional={
        "task_id": FIELD_VALUES,
        "task_name": st.sampled_from(sorted(TASK_NAMES)) | FIELD_VALUES,
        "labels": st.dictionaries(st.sampled_from(["run_id", "ack_type", "timeout"]), FIELD_VALUES),
        "labels_types": FIELD_VALUES,
        "args": st.lists(FIELD_VALUES, max_size=2),
        "kwargs": st.dictionaries(
            st.sampled_from(sorted(set().union(*TASK_KWARGS.values()))), FIELD_VALUES
        ),
    },
).map(_dumps)


STEP_TASK = json.loads(step_task_message("r", "s", 0).body)


def test_a_task_whose_ids_hold_a_lone_surrogate_is_set_aside() -> None:
    """Not an ERROR traceback and a start failure at the first storage call: no run has it."""
    task = json.loads(run_task_message("r").body)
    surrogate = "r\ud800"
    task.update(task_id=surrogate, kwargs={"run_id": surrogate})
    task["labels"]["run_id"] = surrogate
    assert BROKER.reject_reason(json.dumps(task)) == "ids must be valid UTF-8 (a lone surrogate)"


@PROPERTY
@given(body=st.one_of(_bodies(STEP_TASK), _near_misses(STEP_TASK), TASK_DICTS))
def test_main_queue_body_is_one_of_our_tasks_or_gets_a_reason(body: str | bytes) -> None:
    text = body.decode(errors="replace") if isinstance(body, bytes) else body
    reason = BROKER.reject_reason(text)
    if reason is not None:
        assert isinstance(reason, str) and reason
        return
    message = BROKER.formatter.loads(text.encode())
    assert message.task_name in TASK_NAMES
    assert message.kwargs.keys() == TASK_KWARGS[message.task_name]
    assert all(isinstance(v, str) for v in message.kwargs.values())


SIGNED_BROKER = CancellableSqsBroker(TaskiqCancelSettings(queue_name="p", signing_key="k"))


@PROPERTY
@given(
    run_id=st.text(min_size=1),
    step_key=st.text(),
    attempt=st.integers(0, 999),
    other=st.text(min_size=1),
)
def test_a_task_is_accepted_only_as_sent(
    run_id: str, step_key: str, attempt: int, other: str
) -> None:
    """What we send passes; the same body with any argument changed (its id no longer
    matching), or unsigned or signed with another key where a key is set, does not."""
    codec = SIGNED_BROKER.codec
    for broker, sent in ((BROKER, None), (SIGNED_BROKER, codec)):
        messages = [
            run_task_message(run_id, sent),
            step_task_message(run_id, step_key, attempt, sent),
            resume_task_message(run_id, attempt + 1, sent),
        ]
        for message in messages:
            assert broker.reject_reason(message.body) is None
            body = json.loads(message.body)
            for name, value in body["kwargs"].items():
                if value != other:
                    changed = {**body, "kwargs": {**body["kwargs"], name: other}}
                    assert broker.reject_reason(json.dumps(changed)) is not None
    unsigned = step_task_message(run_id, step_key, attempt).body
    assert SIGNED_BROKER.reject_reason(unsigned) is not None
    wrong_key = step_task_message(run_id, step_key, attempt, Codec("other")).body
    assert SIGNED_BROKER.reject_reason(wrong_key) is not None


def _task_body(**overrides: Any) -> str:
    body = json.loads(run_task_message("no-such-run").body)
    return json.dumps({**body, **overrides})


def test_bad_messages_on_every_queue_are_logged_deleted_and_work_goes_on(
    deployment: Deployment, capfd: pytest.CaptureFixture[str]
) -> None:
    proc = deployment.start_worker()
    queues = deployment.queues
    names = queues.names
    main_bodies = {
        "not json": "{nope",
        "oversized": json.dumps({"pad": OVERSIZED_PAD}),
        "unknown task name": _task_body(task_name="someone_elses.task"),
        "wrong-typed kwargs": _task_body(kwargs={"run_id": 5}),
        "missing kwargs": _task_body(task_name=EXECUTE_RUN, kwargs={}),
        "taskiq label": _task_body(labels={"run_id": "r", "ack_type": "nonsense"}),
        "unknown version": '{"v": 2, "run_id": "r"}',
        **PATHOLOGICAL,
    }
    cancel_bodies = {
        "not json": "{nope",
        "oversized": json.dumps({"v": 1, "run_id": "r", "pad": OVERSIZED_PAD}),
        "wrong types": '{"v": 1, "run_id": 5}',
        "unknown version": '{"v": 2, "run_id": "r"}',
        **PATHOLOGICAL,
    }
    ack_bodies = {
        "not json": "{nope",
        "oversized": json.dumps(
            {"v": 1, "run_id": "r", "worker_id": "w", "outcome": "killed", "pad": OVERSIZED_PAD}
        ),
        "wrong types": '{"v": 1, "run_id": "r", "worker_id": 5, "outcome": "killed"}',
        "unknown version": '{"v": 2, "run_id": "r", "worker_id": "w", "outcome": "killed"}',
        **PATHOLOGICAL,
    }

    def send_all(name: str, bodies: dict[str, str]) -> dict[str, str]:
        return {
            what: queues.send(name, body, "bad", uuid.uuid4().hex) for what, body in bodies.items()
        }

    main_ids = send_all(names.main, main_bodies)
    cancel_ids = send_all(names.cancels, cancel_bodies)
    # Valid, but about runs nobody knows: handled, not malformed.
    queues.send(names.main, run_task_message("no-such-run").body, "bad", uuid.uuid4().hex)
    queues.send(names.cancels, CancelRequest(run_id="no-such-run").to_json(), "bad", "c")
    wait_for(deployment.queue_empty, 60, "main and cancels queues emptied")
    log = deployment.worker_log(0)
    for what, message_id in {**main_ids, **cancel_ids}.items():
        assert message_id in log, f"{what} not logged with its message id"
    assert proc.poll() is None, "the worker must keep running"

    ack_ids = send_all(names.acks, ack_bodies)
    queues.send(
        names.acks,
        CancelAck(run_id="no-such-run", worker_id="w", outcome="killed").to_json(),
        "bad",
        "a",
    )
    summaries = tick_until(deployment, lambda: acks_queue_empty(deployment))
    sensor_log = capfd.readouterr().err  # the sensor logs through Dagster's logger, to stderr
    assert count(summaries, "malformed") == len(ack_bodies)
    assert count(summaries, "unknown run") >= 1
    for what, message_id in ack_ids.items():
        assert message_id in sensor_log, f"ack {what} not logged with its message id"

    run_id = deployment.launch(sleepy_job)
    deployment.wait_status(run_id, {DagsterRunStatus.SUCCESS}, timeout=120)
    assert proc.poll() is None


def test_cancel_loop_outlives_pathological_bodies_and_still_stops_a_run(
    deployment: Deployment,
) -> None:
    """With a 60 s poll, only a live cancel loop can stop the run within seconds."""
    deployment.start_worker("--poll-interval-seconds", "60")
    run_id = deployment.launch(sleepy_job, seconds=300)
    pid = deployment.op_pid(run_id)
    deployment.wait_status(run_id, {DagsterRunStatus.STARTED})
    queues = deployment.queues
    ids = {
        what: queues.send(queues.names.cancels, body, "bad", uuid.uuid4().hex)
        for what, body in PATHOLOGICAL.items()
    }
    wait_for(deployment.queue_empty, 30, "pathological cancel messages deleted")
    log = deployment.worker_log(0)
    for what, message_id in ids.items():
        assert message_id in log, f"{what} not logged with its message id"
    started = time.monotonic()
    assert deployment.instance.run_launcher.terminate(run_id)
    wait_for(lambda: not pid_alive(pid), 10, "the cancel message stops the run")
    assert time.monotonic() - started < 10
    deployment.wait_status(run_id, {DagsterRunStatus.CANCELED}, timeout=30)


def test_one_batch_with_pathological_acks_still_ends_its_valid_run(
    deployment: Deployment, caplog: pytest.LogCaptureFixture
) -> None:
    run_id = deployment.launch(sleepy_job)
    set_canceling(deployment, run_id)
    acks = deployment.queues.names.acks
    bad = list(PATHOLOGICAL.values())[: ACK_BATCH - 1]
    ids = [deployment.queues.send(acks, body, "bad", uuid.uuid4().hex) for body in bad]
    valid = CancelAck(run_id=run_id, task_id=run_id, worker_id="w", outcome="killed")
    deployment.queues.send(acks, valid.to_json(), "bad", uuid.uuid4().hex)
    batch: list[dict[str, Any]] = []

    def received_all() -> bool:
        batch.extend(_receive(deployment.queues, ACK_BATCH, 1))
        return len(batch) == len(bad) + 1

    wait_for(received_all, 30, "every ack received")
    summary = TickSummary()
    _handle_batch(deployment.instance, deployment.queues, batch, summary, logging.getLogger("t"))
    assert (summary.malformed, summary.canceled) == (len(bad), 1)
    assert deployment.status(run_id) == DagsterRunStatus.CANCELED
    assert acks_queue_empty(deployment)
    assert all(message_id in caplog.text for message_id in ids)


@MOTO_ONLY
@pytest.mark.parametrize("loop", ["listen", "poll_loop", "cancel_loop"])
def test_a_worker_whose_loop_dies_stops_its_work_and_exits_non_zero(
    deployment: Deployment, loop: str
) -> None:
    trigger = deployment.root / "die"
    deployment.env = {**deployment.env, "DYING_LOOP": loop, "DYING_TRIGGER": str(trigger)}
    worker = deployment.start_worker(module="dagster_taskiq_cancel_tests.dying_worker")
    run_id = deployment.launch(sleepy_job, seconds=300)
    pid = deployment.op_pid(run_id)
    deployment.wait_status(run_id, {DagsterRunStatus.STARTED})
    trigger.touch()
    wait_for(lambda: worker.poll() is not None, 30, "the worker exits")
    assert worker.returncode != 0
    log = deployment.worker_log(0)
    assert "Traceback" in log and f"injected failure: {trigger} exists" in log, log
    assert not pid_alive(pid), "its work stops with it"
    assert any(
        "is shutting down and its" in m and "failed" in m
        for m in deployment.engine_messages(run_id)
    )
