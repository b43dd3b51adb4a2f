"""Every Prometheus metric of a worker process, and the small calls that record them.

The worker, its broker and its loops record through the functions below, so that what is
measured, and under which labels, is in one place. Labels are small fixed sets (task kind,
outcome, loop, operation), never a run id: a fleet's series count must not grow with its runs.

With ``--workers N`` the parent sets ``PROMETHEUS_MULTIPROC_DIR`` before it starts the
processes, so each one writes its values to files there and the parent serves their sum
(``health``); prometheus_client reads that variable when it is first imported.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Mapping
from concurrent.futures import Executor
from typing import Any, Protocol, TypeVar

from dagster import DagsterEventType, DagsterInstance
from prometheus_client import Counter, Gauge, Histogram

from dagster_taskiq_cancel.tasks import EXECUTE_RUN, EXECUTE_STEP, RESUME_RUN

logger = logging.getLogger(__name__)
T = TypeVar("T")


class Task(Protocol):
    """What the metrics read of a task a worker holds (``worker.held.HeldTask``)."""

    task_id: str
    run_id: str
    step_key: str | None
    stop_started_at: float | None
    cancel: bool
    killed: bool
    fenced_because: str | None


PREFIX = "dagster_taskiq_cancel_"
# Set by the parent of --workers N: its children write to the directory and do not serve.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
SERVED_BY_PARENT_ENV = "DAGSTER_TASKIQ_CANCEL_METRICS_SERVED_BY_PARENT"
KINDS = {EXECUTE_RUN: "run", EXECUTE_STEP: "step", RESUME_RUN: "resume"}
# The loops whose ticks the health check reads (names as the worker's loop table has them).
HEARTBEAT_LOOP = "heartbeat loop"
POLL_LOOP = "run storage poll"
CANCEL_LOOP = "cancel loop"

_LONG = (1, 5, 15, 60, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 24 * 3600)
_WAIT = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
_STOP = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30, 60, 120, 300)

TASKS_RECEIVED = Counter(
    f"{PREFIX}tasks_received", "Well-formed task messages taken from the main queue.", ["kind"]
)
TASKS_STARTED = Counter(
    f"{PREFIX}tasks_started", "Tasks whose Dagster child process was started.", ["kind"]
)
TASKS_FINISHED = Counter(
    f"{PREFIX}tasks_finished",
    "Received tasks that are done: succeeded, failed, cancelled, killed, fenced, stopped (run "
    "ended or shutdown), or never started: skipped (run cancelled), dropped, start_failed.",
    ["kind", "outcome"],
)
TASKS_IN_FLIGHT = Gauge(
    f"{PREFIX}tasks_in_flight",
    "Tasks whose child process runs now.",
    ["kind"],
    multiprocess_mode="livesum",
)
TASKS_REJECTED = Counter(
    f"{PREFIX}tasks_rejected", "Malformed or badly signed task messages deleted unrun."
)
QUEUE_WAIT = Histogram(
    f"{PREFIX}queue_wait_seconds",
    "From SQS SentTimestamp to receipt by a worker.",
    ["kind"],
    buckets=_WAIT,
)
TASK_DURATION = Histogram(
    f"{PREFIX}task_duration_seconds",
    "From child start to child exit.",
    ["kind", "outcome"],
    buckets=_LONG,
)
CANCEL_REQUESTS = Counter(
    f"{PREFIX}cancel_requests",
    "Messages read from the cancels queue: woke (names held work), not_running, malformed.",
    ["result"],
)
CANCEL_LATENCY = Histogram(
    f"{PREFIX}cancel_latency_seconds",
    "From the run's RUN_CANCELING event to the task's process gone.",
    ["kind"],
    buckets=_STOP,
)
STOP_OUTCOMES = Counter(
    f"{PREFIX}stop_outcomes",
    "Cancel acknowledgements, by outcome (cancelled, killed, skipped, not_running, "
    "cleanup_failed).",
    ["outcome"],
)
SQS_ERRORS = Counter(f"{PREFIX}sqs_errors", "Failed SQS calls.", ["operation"])
for _operation in ("receive", "send", "delete", "change_visibility"):
    SQS_ERRORS.labels(_operation)  # exported as 0 from the start, for rate() and alerts
STORAGE_ERRORS = Counter(
    f"{PREFIX}storage_errors", "Failed or timed-out run storage calls.", ["operation"]
)
SQS_UP = Gauge(
    f"{PREFIX}sqs_up",
    "1 while the latest SQS receive answered, 0 after it failed.",
    multiprocess_mode="liveall",
)
STORAGE_LAST_SUCCESS = Gauge(
    f"{PREFIX}storage_last_success_timestamp_seconds",
    "When a run storage call last succeeded.",
    multiprocess_mode="liveall",
)
LOOP_UP = Gauge(
    f"{PREFIX}loop_up",
    "1 while the loop runs, 0 once it ended.",
    ["loop"],
    multiprocess_mode="liveall",
)
LOOP_TICK = Gauge(
    f"{PREFIX}loop_last_tick_timestamp_seconds",
    "When the loop last went round.",
    ["loop"],
    multiprocess_mode="liveall",
)

_started: dict[str, float] = {}  # task id -> monotonic start, while its child runs
_exited: dict[str, tuple[float, float]] = {}  # task id -> (duration, wall-clock exit)


def child_env(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` for a task's processes: without the parent's metrics directory, which they
    would otherwise fill with files of their own (one set per run, never removed)."""
    if not env.get(SERVED_BY_PARENT_ENV):
        return dict(env)
    return {k: v for k, v in env.items() if k not in (MULTIPROC_ENV, SERVED_BY_PARENT_ENV)}


def kind_of(task_id: str, step_key: str | None) -> str:
    if step_key is not None:
        return "step"
    return "resume" if "-resume-" in task_id else "run"


# --- the main queue ---------------------------------------------------------------------------


def task_received(task_name: str, message: Mapping[str, Any]) -> None:
    """Count a task taken from SQS and how long it waited there (server clock, so >= 0)."""
    kind = KINDS.get(task_name, "unknown")
    TASKS_RECEIVED.labels(kind).inc()
    try:
        sent = int(message["Attributes"]["SentTimestamp"]) / 1000
    except (KeyError, TypeError, ValueError):  # a server that does not give it: no wait known
        return
    QUEUE_WAIT.labels(kind).observe(max(0.0, time.time() - sent))


def task_rejected() -> None:
    TASKS_REJECTED.inc()


def task_not_started(task_id: str, step_key: str | None, outcome: str) -> None:
    """A received task that ends without a child: skipped, dropped or start_failed."""
    TASKS_FINISHED.labels(kind_of(task_id, step_key), outcome).inc()


def task_started(held: Task) -> None:
    kind = kind_of(held.task_id, held.step_key)
    TASKS_STARTED.labels(kind).inc()
    TASKS_IN_FLIGHT.labels(kind).inc()
    _started[held.task_id] = time.monotonic()


def task_exited(held: Task) -> None:
    """The child is gone: out of flight now; the outcome is known only once settled."""
    TASKS_IN_FLIGHT.labels(kind_of(held.task_id, held.step_key)).dec()
    started = _started.pop(held.task_id, None)
    if started is not None:
        _exited[held.task_id] = (time.monotonic() - started, time.time())


def task_ended(
    held: Task, returncode: int | None, instance: DagsterInstance, storage: Executor
) -> None:
    """Count a settled task by outcome; for a cancel, measure RUN_CANCELING to process gone.

    The cancel's time is read from the event log on the storage thread, after the settle and
    without waiting for it: a metric must never hold up an ack.
    """
    kind = kind_of(held.task_id, held.step_key)
    if held.fenced_because is not None:
        outcome = "fenced"
    elif held.cancel:
        outcome = "killed" if held.killed else "cancelled"
    elif held.stop_started_at is not None:
        outcome = "stopped"
    else:
        outcome = "succeeded" if returncode == 0 else "failed"
    TASKS_FINISHED.labels(kind, outcome).inc()
    duration, exited_at = _exited.pop(held.task_id, (None, None))
    if duration is None or exited_at is None:
        return
    TASK_DURATION.labels(kind, outcome).observe(duration)
    if outcome in ("cancelled", "killed"):
        storage.submit(_observe_cancel_latency, instance, held.run_id, kind, exited_at)


def _observe_cancel_latency(
    instance: DagsterInstance, run_id: str, kind: str, exited_at: float
) -> None:
    try:
        records = instance.get_records_for_run(
            run_id, of_type=DagsterEventType.RUN_CANCELING, ascending=True, limit=1
        ).records
    except Exception as exc:
        logger.debug("No cancel latency for run %s: %r", run_id, exc)
        return
    if records:
        CANCEL_LATENCY.labels(kind).observe(
            max(0.0, exited_at - records[0].event_log_entry.timestamp)
        )


# --- cancels and acks -------------------------------------------------------------------------


def cancel_request(result: str) -> None:
    CANCEL_REQUESTS.labels(result).inc()


def stop_outcome(outcome: str) -> None:
    STOP_OUTCOMES.labels(outcome).inc()


# --- dependencies and loops -------------------------------------------------------------------


def sqs_error(operation: str) -> None:
    SQS_ERRORS.labels(operation).inc()
    if operation == "receive":
        SQS_UP.set(0)


def sqs_answered() -> None:
    SQS_UP.set(1)


async def storage_call(fn: Any, call: Awaitable[T]) -> T:
    """Await a run storage call, counting its failure or noting its success."""
    try:
        result = await call
    except Exception:
        STORAGE_ERRORS.labels(getattr(fn, "__name__", "call").lstrip("_")).inc()
        raise
    STORAGE_LAST_SUCCESS.set_to_current_time()
    return result


def loop_tick(loop: str) -> None:
    LOOP_TICK.labels(loop).set_to_current_time()


def watch_loops(loops: Mapping[asyncio.Task[None], str]) -> None:
    """Mark each loop up now, and down when its task ends (for any reason)."""
    for task, name in loops.items():
        LOOP_UP.labels(name).set(1)
        task.add_done_callback(lambda _t, name=name: LOOP_UP.labels(name).set(0))
