"""Ask for runs to stop: the one sequence behind terminate(), the resource and bulk cancel.

The order is the point (DESIGN rule 4): CANCELING is recorded first because it is the durable
intent every worker polls for; the CancelRequest is only a hint that makes the holder look now.
Every cancel also writes who asked, why and when into the run's event log (the audit trail),
and, before the intent, ``dagster/max_retries: 0`` on the run: a run a user stopped is never
retried by Dagster's run retries, whatever status it ends in. What the tag was before goes beside
it, so that a re-execution, which inherits its parent's tags, gets its retries back at launch.
"""

from __future__ import annotations

import contextlib
import getpass
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Literal

from dagster import DagsterEventType, DagsterInstance, DagsterRun, DagsterRunStatus, RunsFilter
from dagster._core.events import EngineEventData
from dagster._core.storage.tags import MAX_RETRIES_TAG

from dagster_taskiq_cancel import claims, hints, intents
from dagster_taskiq_cancel.messages import CancelRequest, codec_for
from dagster_taskiq_cancel.queues import SqsError, SyncQueues
from dagster_taskiq_cancel.storage_pool import close_connections, pool_connections
from dagster_taskiq_cancel.tasks import TAG_PREFIX

logger = logging.getLogger(__name__)

HINT_BATCH = 10  # SQS SendMessageBatch takes at most ten entries
WRITERS = 8  # batches in flight at once during a bulk cancel
TERMINATE_REASON = "terminate"

Action = Literal["canceled", "canceling", "skipped", "failed", "would_cancel"]

# Beside ``dagster/max_retries: 0``: the run's own value before the cancel (``DEFAULT_RETRIES``:
# it had none, the instance's ``run_retries.max_retries`` applied).
RETRIES_BEFORE_CANCEL_TAG = f"{TAG_PREFIX}max_retries_before_cancel"
DEFAULT_RETRIES = "default"


def no_retry_tags(run: DagsterRun) -> dict[str, str]:
    """Written before the intent: a run a user stopped is never retried by Dagster's run retries.

    A run cancelled twice keeps the value from before its first cancel.
    """
    tags = {MAX_RETRIES_TAG: "0"}
    if not run.tags.get(RETRIES_BEFORE_CANCEL_TAG):
        tags[RETRIES_BEFORE_CANCEL_TAG] = run.tags.get(MAX_RETRIES_TAG, DEFAULT_RETRIES)
    return tags


def retries_restored(instance: DagsterInstance, run: DagsterRun) -> dict[str, str]:
    """Tags giving a re-execution of a cancelled run its retries back (none for other runs).

    Dagster copies the parent's tags onto a re-execution, the cancel's ``max_retries: 0`` too;
    the user re-ran it, so it is retried as the parent would have been before the cancel.
    """
    before = run.tags.get(RETRIES_BEFORE_CANCEL_TAG)
    if run.parent_run_id is None or not before:
        return {}
    retries = str(instance.run_retries_max_retries) if before == DEFAULT_RETRIES else before
    return {MAX_RETRIES_TAG: retries, RETRIES_BEFORE_CANCEL_TAG: ""}


# Who a cancel is for while Dagster routes it through terminate() (the run coordinator does that
# for a run dequeued after we selected it); unset, terminate() is the webserver acting for the UI.
_on_behalf: ContextVar[tuple[str, str] | None] = ContextVar("taskiq_cancel_on_behalf", default=None)


@dataclass(frozen=True)
class CancelOutcome:
    """What one cancel did to one run; ``hint_sent`` is False when only the poll will see it."""

    run_id: str
    status_before: DagsterRunStatus | None
    action: Action
    error: str | None = None
    hint_sent: bool = False


@contextlib.contextmanager
def on_behalf_of(requested_by: str, reason: str) -> Iterator[None]:
    """Attribute any terminate() called inside this block to ``requested_by``, not to the UI."""
    token = _on_behalf.set((requested_by, reason))
    try:
        yield
    finally:
        _on_behalf.reset(token)


def environment_user() -> str:
    """The user running this process, for the audit trail of cancels from scripts and the CLI."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name and no passwd entry, as in some containers
        return f"uid {os.getuid()}"


def terminate_requester() -> tuple[str, str]:
    """(requested_by, reason) for terminate(): the caller we act for, else the webserver's UI."""
    return _on_behalf.get() or (
        os.environ.get("DAGSTER_TASKIQ_REQUESTED_BY") or "ui",
        TERMINATE_REASON,
    )


def audit_text(request: CancelRequest) -> str:
    """The event-log line every cancel writes: who, when, why and which request."""
    when = datetime.fromtimestamp(request.requested_at, timezone.utc).isoformat(
        timespec="milliseconds"
    )
    why = request.reason or "no reason given"
    return (
        f"Cancel requested by {request.requested_by} at {when}; reason: {why}; "
        f"request {request.request_id}."
    )


_AUDIT_REQUEST = re.compile(r"; request (\S+)\.$")


def audit_request_id(text: str) -> str | None:
    """The request id an ``audit_text`` line names; None for any other text."""
    found = _AUDIT_REQUEST.search(text)
    return found[1] if found else None


def latest_request_id(instance: DagsterInstance, run_id: str) -> str | None:
    """The request id of the run's latest RUN_CANCELING, written with ``audit_text``.

    A worker that stopped a run on its poll (no hint reached it) has no request in hand; this
    ties its acknowledgement to the request the run's log already shows.
    """
    records = instance.get_records_for_run(
        run_id, of_type=DagsterEventType.RUN_CANCELING, ascending=False, limit=1
    ).records
    event = records[0].event_log_entry.dagster_event if records else None
    return audit_request_id(event.message or "") if event is not None else None


def audit_metadata(request: CancelRequest) -> dict[str, str | float]:
    """``audit_text`` as engine-event metadata, which the UI shows as a table."""
    return {
        "requested_by": request.requested_by,
        "reason": request.reason,
        "request_id": request.request_id,
        "requested_at": request.requested_at,
    }


def request_cancel(
    instance: DagsterInstance, queues: SyncQueues, run_id: str, reason: str, requested_by: str
) -> bool:
    """Cancel one run; True once its intent is recorded (or it left the queue CANCELED)."""
    (outcome,) = request_cancels(instance, queues, [run_id], reason, requested_by)
    return outcome.action in ("canceled", "canceling")


def request_cancels(
    instance: DagsterInstance,
    queues: SyncQueues,
    run_ids: Sequence[str],
    reason: str,
    requested_by: str,
) -> list[CancelOutcome]:
    """Cancel runs in batches of ten, several batches at once; outcomes in ``run_ids`` order.

    Each run costs a few storage commits, which wait on the disk or the database rather than
    on Python, so overlapping batches (on pooled connections) is what makes 1,000 runs take
    seconds, not minutes.
    """
    batches = [run_ids[i : i + HINT_BATCH] for i in range(0, len(run_ids), HINT_BATCH)]
    if len(batches) <= 1:
        canceller = _Canceller(instance, queues, reason, requested_by)
        return [outcome for batch in batches for outcome in canceller.batch(batch)]
    with (
        pooled_instance(instance) as pooled,
        ThreadPoolExecutor(min(WRITERS, len(batches)), "taskiq-cancel") as pool,
    ):
        canceller = _Canceller(pooled, queues, reason, requested_by)
        return [outcome for done in pool.map(canceller.batch, batches) for outcome in done]


@contextlib.contextmanager
def pooled_instance(instance: DagsterInstance) -> Iterator[DagsterInstance]:
    """The same storage with a connection pool, for one bulk write (a cancel, a test's set-up).

    dagster-postgres opens a new connection for every storage call (NullPool): about 20 ms
    each with password authentication, most of what a cancel's five storage calls cost.
    dagster-webserver holds a pool for the same reason; a bulk cancel holds one (a connection
    per writer) on an instance of its own, so the caller's instance is left as it was.
    """
    if instance.is_ephemeral:  # in memory: nothing to connect to
        yield instance
        return
    with DagsterInstance.from_ref(instance.get_ref()) as pooled:
        try:
            yield pool_connections(pooled, threads=WRITERS)
        finally:
            close_connections(pooled)


@dataclass(frozen=True)
class _Canceller:
    """One request to stop runs: the storage it records in, the queues it hints, who and why."""

    instance: DagsterInstance
    queues: SyncQueues
    reason: str
    requested_by: str

    def batch(self, run_ids: Sequence[str]) -> list[CancelOutcome]:
        """Re-read up to ten runs, record intent for each, then hint them in one SQS request.

        Re-reading just before writing keeps the window in which a run can finish between the
        read and the CANCELING write as short as for a single cancel (DESIGN rule 6); on
        Postgres the write itself re-reads under a row lock, so the window is closed.
        """
        runs = {r.run_id: r for r in self.instance.get_runs(RunsFilter(run_ids=list(run_ids)))}
        outcomes: list[CancelOutcome] = []
        to_record: dict[str, tuple[DagsterRun, CancelRequest]] = {}
        for run_id in run_ids:
            run = runs.get(run_id)
            if run is None or run.is_finished:
                outcomes.append(CancelOutcome(run_id, run.status if run else None, "skipped"))
                continue
            request = CancelRequest(
                run_id=run_id, reason=self.reason, requested_by=self.requested_by
            )
            if run.status == DagsterRunStatus.QUEUED:
                outcomes.append(self._guarded(run, lambda r=run, q=request: self._dequeue(r, q)))
            else:
                to_record[run_id] = (run, request)
        recorded, failed = self._record(to_record)
        by_run = {o.run_id: o for o in [*outcomes, *failed, *self._hint(recorded)]}
        return [by_run[run_id] for run_id in run_ids]

    def _record(
        self, to_record: Mapping[str, tuple[DagsterRun, CancelRequest]]
    ) -> tuple[list[tuple[DagsterRun, CancelRequest]], list[CancelOutcome]]:
        """Tag and mark CANCELING: one transaction on Postgres, else Dagster's calls per run."""
        if to_record and intents.batchable(self.instance):
            try:
                found = intents.record_canceling(
                    self.instance,
                    {run_id: audit_text(request) for run_id, (_, request) in to_record.items()},
                    no_retry_tags,
                )
            except Exception:  # fall back to one run at a time, which reports each failure
                logger.exception(
                    "Batched cancel of %d runs failed; cancelling one by one", len(to_record)
                )
            else:
                written = [v for k, v in to_record.items() if found.get(k) in intents.CANCELABLE]
                finished = [
                    CancelOutcome(run_id, found.get(run_id), "skipped")
                    for run_id in to_record
                    if found.get(run_id) not in intents.CANCELABLE
                ]
                return written, finished
        recorded, failed = [], []
        for run, request in to_record.values():
            outcome = self._guarded(run, lambda r=run, q=request: self._record_one(r, q))
            if outcome is None:
                recorded.append((run, request))
            else:
                failed.append(outcome)
        return recorded, failed

    def _record_one(self, run: DagsterRun, request: CancelRequest) -> None:
        self.instance.add_run_tags(run.run_id, no_retry_tags(run))
        self.instance.report_run_canceling(run, message=audit_text(request))

    @staticmethod
    def _guarded(
        run: DagsterRun, write: Callable[[], CancelOutcome | None]
    ) -> CancelOutcome | None:
        """A storage error on one run must not stop the others: it becomes that run's outcome."""
        try:
            return write()
        except Exception as exc:
            logger.exception("Could not cancel run %s", run.run_id)
            return CancelOutcome(run.run_id, run.status, "failed", f"{type(exc).__name__}: {exc}")

    def _dequeue(self, run: DagsterRun, request: CancelRequest) -> CancelOutcome:
        """Dagster's own path for a run still in its queue; the audit event goes first."""
        self.instance.report_engine_event(
            audit_text(request), run, EngineEventData(audit_metadata(request))
        )
        with on_behalf_of(request.requested_by, request.reason):
            if self.instance.run_coordinator.cancel_run(run.run_id):
                return CancelOutcome(run.run_id, run.status, "canceled")
        return CancelOutcome(run.run_id, run.status, "failed", "the run coordinator refused")

    def _hint(self, recorded: Sequence[tuple[DagsterRun, CancelRequest]]) -> list[CancelOutcome]:
        """Send up to ten CancelRequests in one SQS request; a failure is noted on each run.

        SQS reports partial failures without saying which runs they hit in a form we keep, so
        any failure marks the whole batch unsent: the poll stops those runs anyway.
        """
        if not recorded:
            return []
        codec = codec_for(self.queues.settings)  # signs when a key is configured
        bodies = [(run, codec.dumps(request), request.request_id) for run, request in recorded]
        # The holders' own queues first: the holder hears these at once (``hints``).
        try:
            found = claims.run_claims(self.instance, [run.run_id for run, _ in recorded])
        except Exception as exc:  # only the fast path is lost: the poll stops them anyway
            logger.warning("Could not read who holds the runs to hint: %s", exc)
            found = {}
        run_holders = {run_id: claim.worker_id for run_id, claim in found.items()}
        hints.send_to_holders(self.queues, bodies, run_holders)
        entries = [(body, run.run_id, dedup_id) for run, body, dedup_id in bodies]
        try:
            failures = self.queues.send_batch(self.queues.names.cancels, entries)
        except SqsError as exc:
            failures = [str(exc)]
        if failures:
            logger.warning(
                "Cancel messages for %d runs not all sent (%s); the poll will stop them",
                len(recorded),
                failures[0],
            )
            for run, _ in recorded:
                self.instance.report_engine_event(
                    f"Cancel message not sent ({failures[0]}); workers will see CANCELING at "
                    "their next poll.",
                    run,
                )
        return [
            CancelOutcome(run.run_id, run.status, "canceling", hint_sent=not failures)
            for run, _ in recorded
        ]
