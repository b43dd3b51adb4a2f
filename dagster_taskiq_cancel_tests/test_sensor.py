"""The reconciliation sensor ends CANCELING runs from worker acks, and only CANCELING runs."""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import dagster as dg
import pytest
from dagster import DagsterEventType, DagsterRunStatus
from sqlalchemy.exc import OperationalError

from dagster_taskiq_cancel import (
    TaskiqCancelResource,
    build_cancel_reconciliation_sensor,
    cancel_reconciliation_sensor,
    heartbeats,
)
from dagster_taskiq_cancel.local_sqs import LocalSqsServer
from dagster_taskiq_cancel.messages import CancelAck, Codec
from dagster_taskiq_cancel_tests.jobs import sleepy_job, stubborn_job
from dagster_taskiq_cancel_tests.stack import MOTO_ONLY, Deployment, hold, pid_alive, wait_for

CANCELED = DagsterRunStatus.CANCELED
SENSOR = "dagster_taskiq_cancel reconciliation sensor: "


# Ticks of about a second, for tests that watch clocks of a few seconds.
quick_sensor = build_cancel_reconciliation_sensor(ack_wait_seconds=1)


def tick(
    deployment: Deployment,
    sensor: dg.SensorDefinition = cancel_reconciliation_sensor,
    **resource_fields: Any,
) -> str:
    """Evaluate the sensor once, as the daemon would, and return its skip message."""
    fields = {**deployment.settings.model_dump(exclude_none=True), **resource_fields}
    context = dg.build_sensor_context(
        instance=deployment.instance, resources={"taskiq": TaskiqCancelResource(**fields)}
    )
    result = sensor(context)
    assert isinstance(result, dg.SkipReason)
    return result.skip_message or ""


def tick_until(
    deployment: Deployment,
    done: Callable[[], bool],
    timeout: float = 60,
    sensor: dg.SensorDefinition = cancel_reconciliation_sensor,
    **resource_fields: Any,
) -> list[str]:
    """Evaluate the sensor until ``done()``, a tick every 0.2 s at most (a tick does not
    long-poll by default)."""
    summaries: list[str] = []

    def one_tick() -> bool:
        summaries.append(tick(deployment, sensor, **resource_fields))
        return done()

    wait_for(one_tick, timeout, "sensor to reconcile", interval=0.2)
    return summaries


def count(summaries: list[str], what: str) -> int:
    return sum(int(m) for s in summaries for m in re.findall(rf"{what} (\d+)", s))


def send_ack(deployment: Deployment, body: str) -> None:
    queues = deployment.queues
    queues.send(queues.names.acks, body, group_id="test", dedup_id=uuid.uuid4().hex)


def acks_queue_empty(deployment: Deployment) -> bool:
    counts = deployment.queues.depths()[deployment.queues.names.acks]
    return counts["visible"] == 0 and counts["in_flight"] == 0


def set_canceling(deployment: Deployment, run_id: str) -> None:
    run = deployment.instance.get_run_by_id(run_id)
    assert run is not None
    deployment.instance.report_run_canceling(run)


def _ack_recorded(deployment: Deployment, run_id: str, outcome: str) -> bool:
    return any(
        m.startswith(SENSOR) and "acknowledged the cancel" in m and outcome in m
        for m in deployment.engine_messages(run_id)
    )


@MOTO_ONLY
def test_killed_runs_ack_is_recorded_on_the_run_the_worker_already_ended(
    deployment: Deployment,
) -> None:
    """The worker writes CANCELED itself after the SIGKILL; its ack, read later, is only
    recorded: the sensor writes no second status."""
    deployment.start_worker("--grace-seconds", "2")
    run_id = deployment.launch(stubborn_job, seconds=120)
    pid = deployment.op_pid(run_id)
    deployment.wait_status(run_id, {DagsterRunStatus.STARTED})
    assert deployment.instance.run_launcher.terminate(run_id)
    wait_for(lambda: not pid_alive(pid), 30, f"pid {pid} killed")
    deployment.wait_status(run_id, {CANCELED}, timeout=10)

    summaries = tick_until(deployment, lambda: _ack_recorded(deployment, run_id, "killed"))
    assert count(summaries, "canceled") == 0
    assert deployment.status(run_id) == CANCELED
    canceled = deployment.instance.get_records_for_run(
        run_id, of_type=DagsterEventType.RUN_CANCELED
    ).records
    assert len(canceled) == 1
    (ack,) = [
        entry.dagster_event
        for entry in deployment.instance.all_logs(run_id)
        if entry.dagster_event and "acknowledged the cancel" in (entry.dagster_event.message or "")
    ]
    latency = ack.engine_event_data.metadata["latency_seconds"].value
    assert 0 < latency == round(latency, 3)  # milliseconds, not 16 decimals


@MOTO_ONLY
def test_run_cancelled_before_it_started_is_skipped_and_ends_canceled(
    deployment: Deployment,
) -> None:
    run_id = deployment.launch(sleepy_job)
    set_canceling(deployment, run_id)
    deployment.start_worker()

    tick_until(deployment, lambda: deployment.status(run_id) == CANCELED)
    acks = [m for m in deployment.engine_messages(run_id) if "acknowledged the cancel" in m]
    assert len(acks) == 1 and "skipped" in acks[0], acks
    assert acks[0].startswith(SENSOR), acks  # the README's tour says who wrote it
    assert deployment.executions(run_id) == 0


@MOTO_ONLY
def test_cancel_nobody_confirms_times_out_with_a_warning(deployment: Deployment) -> None:
    run_id = deployment.launch(sleepy_job)
    hold(deployment.instance, run_id, "host-a:123")
    set_canceling(deployment, run_id)
    tick(deployment)
    assert deployment.status(run_id) == DagsterRunStatus.CANCELING, "120 s default not reached"

    summaries = tick_until(
        deployment, lambda: deployment.status(run_id) == CANCELED, cancel_timeout_seconds=1
    )
    assert count(summaries, "timed out") == 1
    warnings = [
        entry.dagster_event.message or ""
        for entry in deployment.instance.all_logs(run_id)
        if entry.dagster_event is not None and entry.level == logging.WARNING
    ]
    assert any(
        w.startswith(f"{SENSOR}No worker confirmed") and "host-a:123" in w for w in warnings
    ), warnings


@MOTO_ONLY
def test_acks_never_overwrite_a_status_other_than_canceling(deployment: Deployment) -> None:
    deployment.start_worker()
    canceled = deployment.launch(sleepy_job, seconds=120)
    live = deployment.launch(sleepy_job, seconds=120)
    done = deployment.launch(sleepy_job)
    deployment.wait_status(done, {DagsterRunStatus.SUCCESS})
    for run_id in (canceled, live):
        deployment.op_pid(run_id)
        deployment.wait_status(run_id, {DagsterRunStatus.STARTED})
    assert deployment.instance.run_launcher.terminate(canceled)
    deployment.wait_status(canceled, {CANCELED}, timeout=30)  # Dagster wrote it itself
    claimed = deployment.create_run(sleepy_job).run_id  # held elsewhere: a skip proves nothing
    hold(deployment.instance, claimed, "host-b:1")
    set_canceling(deployment, claimed)
    for run_id, outcome in ((done, "cancelled"), (live, "killed"), (claimed, "skipped")):
        forged = CancelAck(run_id=run_id, task_id=run_id, worker_id="forger", outcome=outcome)
        send_ack(deployment, forged.to_json())

    def all_recorded() -> bool:
        return all(
            any("acknowledged" in m for m in deployment.engine_messages(run_id))
            for run_id in (canceled, live, done, claimed)
        )

    summaries = tick_until(deployment, all_recorded)
    assert any("cancelled" in m for m in deployment.engine_messages(canceled))
    assert deployment.status(canceled) == CANCELED
    assert deployment.status(done) == DagsterRunStatus.SUCCESS
    assert deployment.status(live) == DagsterRunStatus.STARTED
    assert deployment.status(claimed) == DagsterRunStatus.CANCELING
    assert count(summaries, "canceled") == 0
    canceled_events = deployment.instance.get_records_for_run(
        canceled, of_type=DagsterEventType.RUN_CANCELED
    ).records
    assert len(canceled_events) == 1


def test_malformed_and_unknown_acks_are_deleted_and_the_tick_succeeds(
    deployment: Deployment,
) -> None:
    send_ack(deployment, "{not json")
    send_ack(deployment, '{"v": 2, "run_id": "r", "worker_id": "w", "outcome": "killed"}')
    send_ack(deployment, CancelAck(run_id="no-such-run", worker_id="w", outcome="killed").to_json())

    summaries = tick_until(deployment, lambda: acks_queue_empty(deployment))
    assert count(summaries, "malformed") == 2
    assert count(summaries, "unknown run") == 1


@MOTO_ONLY
def test_an_idle_tick_holds_the_daemon_under_a_second(deployment: Deployment) -> None:
    """With Dagster's default ``sensors.use_threads: false`` a tick holds every other sensor:
    an idle one (a new resource, as the daemon makes each tick) does not wait for acks."""
    durations = []
    for _ in range(3):
        started = time.monotonic()
        assert tick(deployment) == "Cancel reconciliation: nothing to do."
        durations.append(time.monotonic() - started)
    print(f"\nidle ticks: {', '.join(f'{d:.2f}s' for d in durations)}")
    assert sorted(durations)[1] < 1.0


@MOTO_ONLY
def test_one_hundred_acks_are_handled_within_two_ticks(deployment: Deployment) -> None:
    run_ids = [deployment.create_run(sleepy_job).run_id for _ in range(100)]
    for run_id in run_ids:
        set_canceling(deployment, run_id)
    entries = [
        (
            CancelAck(run_id=run_id, task_id=run_id, worker_id="w", outcome="skipped").to_json(),
            run_id,
            uuid.uuid4().hex,
        )
        for run_id in run_ids
    ]
    assert deployment.queues.send_batch(deployment.queues.names.acks, entries) == []

    durations = []
    for _ in range(2):
        started = time.monotonic()
        tick(deployment)
        durations.append(time.monotonic() - started)
        if all(deployment.status(run_id) == CANCELED for run_id in run_ids):
            break
    print(f"\n100 acks: tick durations {', '.join(f'{d:.2f}s' for d in durations)}")
    assert all(deployment.status(run_id) == CANCELED for run_id in run_ids)
    assert acks_queue_empty(deployment)


@MOTO_ONLY
def test_resource_cancel_run_records_intent_then_hints_like_terminate(
    deployment: Deployment,
) -> None:
    taskiq = TaskiqCancelResource(**deployment.settings.model_dump(exclude_none=True))
    run_id = deployment.launch(sleepy_job)
    assert taskiq.cancel_run(deployment.instance, run_id, reason="test")
    assert deployment.status(run_id) == DagsterRunStatus.CANCELING
    assert deployment.queues.depths()[taskiq.queue_names.cancels]["visible"] == 1
    assert not taskiq.cancel_run(deployment.instance, "no-such-run", reason="test")


@MOTO_ONLY
def test_timeout_waits_for_the_runs_notice_and_grace(deployment: Deployment) -> None:
    """Nobody holds the run: the timeout counts from the end of its notice and grace."""
    timing = {"dagster-taskiq/notice_seconds": "3", "dagster-taskiq/grace_seconds": "1"}
    run_id = deployment.create_run(sleepy_job, tags=timing).run_id
    started = time.monotonic()
    set_canceling(deployment, run_id)
    wait_for(lambda: time.monotonic() - started > 1.5, 5, "the bare 1 s timeout to pass")
    tick(deployment, quick_sensor, cancel_timeout_seconds=1)
    assert deployment.status(run_id) == DagsterRunStatus.CANCELING, "notice + grace not over"

    tick_until(
        deployment,
        lambda: deployment.status(run_id) == CANCELED,
        sensor=quick_sensor,
        cancel_timeout_seconds=1,
    )
    assert time.monotonic() - started >= 3 + 1 + 1


@MOTO_ONLY
def test_no_timeout_while_the_holding_worker_is_alive(deployment: Deployment) -> None:
    """A fresh heartbeat from the holder means its processes may still be stopping."""
    run_id = deployment.create_run(sleepy_job, tags={"dagster-taskiq/grace_seconds": "0"}).run_id
    hold(deployment.instance, run_id, "host-c:7")
    set_canceling(deployment, run_id)
    fields: dict[str, Any] = {"cancel_timeout_seconds": 0.5, "heartbeat_timeout_seconds": 3}
    started = time.monotonic()
    summaries: list[str] = []
    while time.monotonic() - started < 2:
        last_beat = time.monotonic()
        heartbeats.beat(
            deployment.instance, "host-c:7", heartbeats.Beat(time.time(), frozenset([run_id]))
        )
        summaries.append(tick(deployment, quick_sensor, **fields))
        assert deployment.status(run_id) == DagsterRunStatus.CANCELING, summaries
    assert count(summaries, "holder alive") >= 1

    tick_until(
        deployment, lambda: deployment.status(run_id) == CANCELED, sensor=quick_sensor, **fields
    )
    assert time.monotonic() - last_beat >= 3, "only once the heartbeat went stale"


def sign_at(codec: Codec, message: CancelAck, at: float) -> str:
    """``message`` signed as if at ``at`` (the ack was sent then and waited in SQS since)."""
    with mock.patch("dagster_taskiq_cancel.messages.time.time", return_value=at):
        return codec.dumps(message)


@MOTO_ONLY
def test_signed_ack_from_an_hour_ago_still_ends_the_run(
    tmp_path: Path, sqs_server: LocalSqsServer
) -> None:
    """A daemon outage of an hour loses no ack; a badly signed one is still set aside."""
    with Deployment(tmp_path, sqs_server.endpoint_url, signing_key="team-secret") as deployment:
        run_id = deployment.create_run(sleepy_job).run_id
        set_canceling(deployment, run_id)
        ack = CancelAck(
            run_id=run_id, task_id=run_id, worker_id="w", outcome="cleanup_failed", detail="gone"
        )
        hour_ago = time.time() - 3700
        send_ack(deployment, sign_at(Codec("team-secret"), ack, hour_ago))
        send_ack(deployment, sign_at(Codec("wrong-key"), ack, time.time()))
        summaries = tick_until(deployment, lambda: acks_queue_empty(deployment))
        assert count(summaries, "malformed") == 1
        assert deployment.status(run_id) == DagsterRunStatus.FAILURE


def test_ack_whose_storage_write_fails_is_kept_and_applied_later(
    deployment: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A transient storage error leaves the ack for redelivery: the run ends FAILURE, as the
    failed cleanup says, and is never marked CANCELED meanwhile."""
    run_id = deployment.create_run(sleepy_job, tags={"dagster-taskiq/grace_seconds": "0"}).run_id
    set_canceling(deployment, run_id)
    ack = CancelAck(run_id=run_id, task_id=run_id, worker_id="w", outcome="cleanup_failed")
    send_ack(deployment, ack.to_json())
    report_run_failed = deployment.instance.report_run_failed
    failures = iter([OperationalError("INSERT", {}, Exception("database is locked"))])

    def flaky(*args: Any, **kwargs: Any) -> Any:
        error = next(failures, None)
        if error is not None:
            raise error
        return report_run_failed(*args, **kwargs)

    monkeypatch.setattr(deployment.instance, "report_run_failed", flaky)
    summaries = tick_until(
        deployment,
        lambda: deployment.status(run_id) != DagsterRunStatus.CANCELING,
        cancel_timeout_seconds=0.1,
    )
    assert count(summaries, "errors") == 1
    assert deployment.status(run_id) == DagsterRunStatus.FAILURE
    canceled = deployment.instance.get_records_for_run(
        run_id, of_type=DagsterEventType.RUN_CANCELED
    ).records
    assert canceled == []
    assert acks_queue_empty(deployment)


@MOTO_ONLY
def test_worker_retries_an_ack_send_that_fails(deployment: Deployment) -> None:
    deployment.env["FLAKY_ACK_FAILURES"] = "2"
    deployment.start_worker(
        "--grace-seconds", "1", module="dagster_taskiq_cancel_tests.flaky_acks_worker"
    )
    run_id = deployment.launch(stubborn_job, seconds=120)
    deployment.op_pid(run_id)
    deployment.wait_status(run_id, {DagsterRunStatus.STARTED})
    assert deployment.instance.run_launcher.terminate(run_id)
    tick_until(deployment, lambda: _ack_recorded(deployment, run_id, "killed"), timeout=30)
    assert deployment.status(run_id) == CANCELED
