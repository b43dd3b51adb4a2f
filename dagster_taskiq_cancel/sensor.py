"""The reconciliation sensor: turns worker acks into run status, and times out silent cancels.

Workers stop Dagster work; when Dagster's own interrupt handling cannot write the end (the child
was SIGKILLed, or the run never started) the run stays CANCELING. Each tick this sensor reads the
``{queue}-cancel-acks`` queue, records every ack on its run as an engine event, ends CANCELING
runs whose run task was confirmed stopped, and then marks CANCELED the CANCELING runs no worker
confirmed: only once the run's notice and grace plus ``cancel_timeout_seconds`` have passed and
no live worker holds it. It writes a status only while the run is still CANCELING (DESIGN rule
6: run status is last-write-wins).

An ack is deleted only once it is applied (or proven useless: malformed, unknown run): one whose
handling raised, say on a storage error, comes back ``RETRY_VISIBILITY_SECONDS`` later. However
late an ack is read, it is still true, so acks never go stale (a daemon outage loses none).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import dagster as dg
from dagster._core.events import DagsterEvent, DagsterEventType, EngineEventData

from dagster_taskiq_cancel import claims, heartbeats
from dagster_taskiq_cancel.cancel import latest_request_id
from dagster_taskiq_cancel.messages import (
    STOPPED_OUTCOMES,
    CancelAck,
    MalformedMessage,
    codec_for,
)
from dagster_taskiq_cancel.queues import SyncQueues
from dagster_taskiq_cancel.resource import TaskiqCancelResource
from dagster_taskiq_cancel.settings import TaskiqCancelSettings
from dagster_taskiq_cancel.timing import stop_seconds

CANCELING = dg.DagsterRunStatus.CANCELING
ACK_BATCH = 10
# Acks stay invisible this long while a tick handles them; one left undeleted comes back.
ACK_VISIBILITY_SECONDS = 60
EVENT_PREFIX = "dagster_taskiq_cancel reconciliation sensor: "
# An ack whose handling failed (storage error) is offered again this soon, within the next tick.
RETRY_VISIBILITY_SECONDS = 2
# Before a timeout writes CANCELED, a tick waits this long for acks: one handed back for a retry
# (``RETRY_VISIBILITY_SECONDS``) may say otherwise (a failed cleanup).
LAST_CALL_WAIT_SECONDS = RETRY_VISIBILITY_SECONDS + 1

_INTERRUPT = "DagsterExecutionInterruptedError"
_OUTCOME_TEXT = {
    "cancelled": "stopped by Dagster's interrupt",
    "killed": "killed with SIGKILL after the grace period",
    "skipped": "skipped before it started",
    "cleanup_failed": "stopped, but cleanup failed",
}


@dataclass
class TickSummary:
    """Counts for one tick, shown as the tick's skip reason in the UI."""

    acks: int = 0
    not_running: int = 0
    malformed: int = 0
    unknown_run: int = 0
    canceled: int = 0
    failed: int = 0
    timed_out: int = 0
    holder_alive: int = 0
    errors: int = 0

    def text(self) -> str:
        counts = ", ".join(
            f"{f.name.replace('_', ' ')} {getattr(self, f.name)}"
            for f in fields(self)
            if getattr(self, f.name)
        )
        return f"Cancel reconciliation: {counts or 'nothing to do'}."


def _record(
    instance: dg.DagsterInstance,
    run: dg.DagsterRun,
    message: str,
    metadata: Mapping[str, Any],
    level: int = logging.INFO,
) -> None:
    """An engine event on ``run``, named as the sensor's: it shows in the run's log among the
    worker's and Dagster's. ``report_engine_event`` has no level, hence the direct event."""
    event = DagsterEvent(
        event_type_value=DagsterEventType.ENGINE_EVENT.value,
        job_name=run.job_name,
        message=f"{EVENT_PREFIX}{message}",
        event_specific_data=EngineEventData(
            metadata={k: v for k, v in metadata.items() if v is not None}
        ),
    )
    instance.report_dagster_event(event, run_id=run.run_id, log_level=level)


def _still_canceling(instance: dg.DagsterInstance, run_id: str) -> dg.DagsterRun | None:
    """The run re-read just before a status write, if it is still CANCELING."""
    run = instance.get_run_by_id(run_id)
    return run if run is not None and run.status == CANCELING else None


def _apply_ack(
    instance: dg.DagsterInstance, run: dg.DagsterRun, ack: CancelAck, summary: TickSummary
) -> None:
    """Record a stop on its run; end the run if its run task stopped and it is still CANCELING.

    ``not_running`` came from whichever worker received the cancel message without holding the
    run (older workers sent it; now a non-holder stays silent): it says nothing about the
    owner, and is only counted. ``skipped`` proves the run is over only if no worker ever
    claimed it: for a claimed run it is a redelivered copy, and the claimer's own ack (or the
    timeout) ends the run.
    """
    if ack.outcome == "not_running":
        summary.not_running += 1
        return
    summary.acks += 1
    latency = ack.stopped_at - ack.requested_at if ack.requested_at is not None else None
    target = f"step {ack.step_key}" if ack.step_key else "run"
    why = "; ".join(filter(None, [_OUTCOME_TEXT[ack.outcome], ack.detail]))
    after = f", {latency:.2f}s after the request" if latency is not None else ""
    interrupted = interrupted_steps(instance, run.run_id) if ack.step_key is None else []
    steps = f" Steps it interrupted: {', '.join(interrupted)}." if interrupted else ""
    _record(
        instance,
        run,
        f"worker {ack.worker_id} acknowledged the cancel: {target} task {ack.task_id} "
        f"{ack.outcome} ({why}){after}.{steps}",
        {
            "outcome": ack.outcome,
            "worker_id": ack.worker_id,
            "task_id": ack.task_id,
            "step_key": ack.step_key,
            "detail": ack.detail,
            "request_id": ack.request_id or latest_request_id(instance, run.run_id),
            "latency_seconds": None if latency is None else round(latency, 3),
            "interrupted_steps": ", ".join(interrupted) or None,
        },
    )
    if ack.outcome == "cleanup_failed":
        _fail_after_cleanup(instance, run.run_id, ack, summary)
        return
    if ack.step_key is not None or ack.outcome not in STOPPED_OUTCOMES:
        return
    current = _still_canceling(instance, run.run_id)
    if current is None or (
        ack.outcome == "skipped" and claims.run_claim(instance, run.run_id) is not None
    ):
        return
    instance.report_run_canceled(current, message=f"Run {ack.outcome} on worker {ack.worker_id}.")
    summary.canceled += 1


def interrupted_steps(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    """The steps a cancel interrupted: Dagster fails each with DagsterExecutionInterruptedError,
    which the UI shows as a red "Errored" step; the ack's event names them, so that the red
    steps read as the cancel's doing."""
    records = instance.get_records_for_run(run_id, of_type=DagsterEventType.STEP_FAILURE).records
    steps = {
        event.step_key
        for event in (record.event_log_entry.dagster_event for record in records)
        if event is not None
        and event.step_key is not None
        and _is_interrupt(getattr(event.event_specific_data, "error", None))
    }
    return sorted(steps)


def _is_interrupt(error: Any) -> bool:
    """Whether a step's error, or one it was raised from, is Dagster's interrupt."""
    while error is not None:
        if error.cls_name == _INTERRUPT:
            return True
        error = error.cause or error.context
    return False


def _fail_after_cleanup(
    instance: dg.DagsterInstance, run_id: str, ack: CancelAck, summary: TickSummary
) -> None:
    """A failed cleanup handler leaves state behind: FAILURE, also over Dagster's own CANCELED.

    The one write over a terminal status: the ack reports the outcome of this same cancel, which
    Dagster's interrupt handling marked CANCELED before the handler had run.
    """
    current = instance.get_run_by_id(run_id)
    if current is None or current.status not in (CANCELING, dg.DagsterRunStatus.CANCELED):
        return
    target = f"step {ack.step_key}" if ack.step_key else "run"
    instance.report_run_failed(
        current, message=f"{target} stopped on {ack.worker_id}; cleanup failed: {ack.detail}"
    )
    summary.failed += 1


def _receive(queues: SyncQueues, max_messages: int, wait_seconds: int) -> list[dict[str, Any]]:
    response = queues.call(
        "receive_message",
        QueueUrl=queues.url(queues.names.acks),
        MaxNumberOfMessages=max_messages,
        WaitTimeSeconds=wait_seconds,
        VisibilityTimeout=ACK_VISIBILITY_SECONDS,
    )
    return response.get("Messages", [])


def _retry_later(queues: SyncQueues, receipts: Sequence[str], log: logging.Logger) -> None:
    """Offer acks that could not be applied again soon; if this fails too, they come back
    after ``ACK_VISIBILITY_SECONDS``."""
    if not receipts:
        return
    result = queues.call(
        "change_message_visibility_batch",
        QueueUrl=queues.url(queues.names.acks),
        Entries=[
            {"Id": str(i), "ReceiptHandle": r, "VisibilityTimeout": RETRY_VISIBILITY_SECONDS}
            for i, r in enumerate(receipts)
        ],
    )
    for failure in result.get("Failed", []):
        log.warning(
            "Could not hand back cancel ack: %s %s", failure.get("Code"), failure.get("Message")
        )


def _delete(queues: SyncQueues, receipts: Sequence[str], log: logging.Logger) -> None:
    if not receipts:
        return
    result = queues.call(
        "delete_message_batch",
        QueueUrl=queues.url(queues.names.acks),
        Entries=[{"Id": str(i), "ReceiptHandle": r} for i, r in enumerate(receipts)],
    )
    for failure in result.get("Failed", []):
        log.warning(
            "Could not delete cancel ack: %s %s", failure.get("Code"), failure.get("Message")
        )


def _handle_batch(
    instance: dg.DagsterInstance,
    queues: SyncQueues,
    messages: Sequence[Mapping[str, Any]],
    summary: TickSummary,
    log: logging.Logger,
) -> set[str]:
    """Handle up to ten acks with one run query; returns the run ids of acks left for later.

    Malformed acks and acks of unknown runs are deleted. An ack whose handling raises (the run
    storage failed) is logged with its message id and left in the queue: deleting it would let
    the timeout write CANCELED over what the worker reported (a failed cleanup, for one).
    """
    handled: list[str] = []
    retry: list[str] = []
    deferred: set[str] = set()
    acks: list[tuple[Mapping[str, Any], CancelAck]] = []
    codec = codec_for(queues.settings)
    for message in messages:
        try:
            acks.append((message, codec.loads(CancelAck, message.get("Body", ""))))
        except MalformedMessage as exc:
            log.warning("Deleting malformed cancel ack %s: %s", message.get("MessageId"), exc)
            summary.malformed += 1
            handled.append(message["ReceiptHandle"])
    try:
        try:
            run_ids = list({ack.run_id for _, ack in acks})
            runs = (
                {r.run_id: r for r in instance.get_runs(dg.RunsFilter(run_ids=run_ids))}
                if acks
                else {}
            )
        except Exception:
            log.exception("Keeping %d cancel acks for a later tick: reading runs failed", len(acks))
            summary.errors += len(acks)
            retry = [message["ReceiptHandle"] for message, _ in acks]
            return {ack.run_id for _, ack in acks}
        for message, ack in acks:
            run = runs.get(ack.run_id)
            if run is None:
                log.info(
                    "Deleting cancel ack %s for unknown run %s",
                    message.get("MessageId"),
                    ack.run_id,
                )
                summary.unknown_run += 1
            else:
                try:
                    _apply_ack(instance, run, ack, summary)
                except Exception:
                    log.exception(
                        "Keeping cancel ack %s for a later tick: handling it failed",
                        message.get("MessageId"),
                    )
                    summary.errors += 1
                    retry.append(message["ReceiptHandle"])
                    deferred.add(ack.run_id)
                    continue
            handled.append(message["ReceiptHandle"])
    finally:
        _delete(queues, handled, log)
        _retry_later(queues, retry, log)
    return deferred


def reconcile_acks(
    instance: dg.DagsterInstance,
    queues: SyncQueues,
    max_acks: int,
    wait_seconds: int,
    summary: TickSummary,
    log: logging.Logger,
) -> set[str]:
    """Read acks until the queue is drained or ``max_acks`` were received. Returns the run ids
    of acks left for later.

    With Dagster's default ``sensors.use_threads: false`` a tick holds every other sensor of
    the deployment, so no receive waits for acks to come, except the first, for
    ``wait_seconds`` (0 by default): an idle tick is one quick request, and a busy one lasts as
    long as its acks take to apply (``max_acks`` bounds it). An ack not read now (a zero wait
    samples only some of AWS's SQS servers) is read by a later tick: acks never go stale.
    """
    received = 0
    wait = wait_seconds
    deferred: set[str] = set()
    while received < max_acks:
        messages = _receive(queues, min(ACK_BATCH, max_acks - received), wait)
        if not messages:
            break
        received += len(messages)
        deferred |= _handle_batch(instance, queues, messages, summary, log)
        wait = 0
    return deferred


def canceling_since(instance: dg.DagsterInstance, record: dg.RunRecord) -> float:
    """When the run's latest CANCELING was recorded, as a Unix timestamp.

    The RUN_CANCELING event is the moment the intent became durable, which is what the timeout
    measures (Dagster's run monitoring uses the same event). The run record's update_timestamp
    is not: it moves on every tag write (a worker's claim, a user's tag edit), so it would push
    the deadline out. It is only the fallback for a CANCELING run without the event.
    """
    events = instance.get_records_for_run(
        record.dagster_run.run_id, of_type=DagsterEventType.RUN_CANCELING, limit=1, ascending=False
    ).records
    return events[0].timestamp if events else record.update_timestamp.timestamp()


def time_out_silent_cancels(
    instance: dg.DagsterInstance,
    settings: TaskiqCancelSettings,
    summary: TickSummary,
    pending: Collection[str] = (),
    last_call: Callable[[], Collection[str]] | None = None,
) -> None:
    """Mark CANCELED the CANCELING runs no worker confirmed, and none can confirm any more.

    A run waits its own notice and grace (what its worker gives the stop before SIGKILL) plus
    ``cancel_timeout_seconds``; after that, still as long as the worker holding it beats (it may
    still be stopping, and its ack is retried until sent). Acks are read first in each tick, so
    a run still CANCELING here had no run-task stop ack, unless its ack is ``pending`` (kept for
    a later tick after a storage error). Before the first timeout, ``last_call`` reads the
    acks once more, waiting: a tick's own read does not wait, and an ack handed back for a retry
    by an earlier tick may only now be visible again.
    """
    records = instance.get_run_records(filters=dg.RunsFilter(statuses=[CANCELING]))
    now = time.time()
    for record in records:
        run_id = record.dagster_run.run_id
        timeout = stop_seconds(record.dagster_run.tags, settings) + settings.cancel_timeout_seconds
        waited = now - canceling_since(instance, record)
        if waited < timeout or run_id in pending:
            continue
        run = _still_canceling(instance, run_id)
        if run is None:
            continue
        claim = claims.run_claim(instance, run_id)
        who = "no worker had started it"
        if claim is not None:
            lost = heartbeats.why_lost(instance, claim, settings.heartbeat_timeout_seconds)
            if lost is None:
                summary.holder_alive += 1
                continue
            who = f"the run's task {lost}"
        if last_call is not None:  # only a tick about to time a run out waits for acks
            pending = {*pending, *last_call()}
            last_call = None
            run = _still_canceling(instance, run_id)
            if run_id in pending or run is None:
                continue
        _record(
            instance,
            run,
            f"No worker confirmed the stop within {timeout:g}s of the cancel request "
            f"(the run's notice and grace plus cancel_timeout_seconds; {who}); marking the run "
            "CANCELED. Check that its processes are gone.",
            {"worker_id": claim.worker_id if claim else None, "waited_seconds": round(waited, 3)},
            level=logging.WARNING,
        )
        instance.report_run_canceled(
            run, message=f"No worker confirmed the stop within {timeout:g}s."
        )
        summary.timed_out += 1


def build_cancel_reconciliation_sensor(
    name: str = "cancel_reconciliation_sensor",
    minimum_interval_seconds: int = 5,
    max_acks_per_tick: int = 100,
    default_status: dg.DefaultSensorStatus = dg.DefaultSensorStatus.RUNNING,
    ack_wait_seconds: int = 0,
) -> dg.SensorDefinition:
    """A polling sensor that needs a ``taskiq`` resource (TaskiqCancelResource).

    ``ack_wait_seconds`` is a long poll at the start of each tick (an ack arriving meanwhile is
    handled at once). A tick holds the sensor daemon, so every other sensor of the deployment
    unless ``sensors.use_threads`` is on, for this wait and its requests: hence none by default.
    An idle tick makes one SQS request either way.
    """

    @dg.sensor(
        name=name,
        minimum_interval_seconds=minimum_interval_seconds,
        default_status=default_status,
        description="Ends CANCELING runs from worker acks; times out cancels nobody confirmed.",
    )
    def _sensor(context: dg.SensorEvaluationContext, taskiq: TaskiqCancelResource) -> dg.SkipReason:
        summary = TickSummary()
        pending = reconcile_acks(
            context.instance,
            taskiq.queues,
            max_acks_per_tick,
            ack_wait_seconds,
            summary,
            context.log,
        )
        last_call = functools.partial(
            reconcile_acks,
            context.instance,
            taskiq.queues,
            max_acks_per_tick,
            LAST_CALL_WAIT_SECONDS,
            summary,
            context.log,
        )
        time_out_silent_cancels(context.instance, taskiq.settings, summary, pending, last_call)
        return dg.SkipReason(summary.text())

    return _sensor


cancel_reconciliation_sensor = build_cancel_reconciliation_sensor()
