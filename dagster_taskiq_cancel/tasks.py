"""The taskiq tasks on the main queue: names, deterministic ids and message bodies.

Senders (launcher, step handler) live in synchronous Dagster code, so they build taskiq's wire
format here with taskiq's own JSON formatter and send it with boto3; the worker registers the
handlers under the same names.

A task carries ids only, never code or Dagster arguments: anyone who can send to the queue can
write one, so the worker rebuilds every argument of its ``dagster api`` child from the run
storage and its own instance. With a signing key, each task also carries a ``mac`` label.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

from taskiq import TaskiqMessage
from taskiq.formatters.json_formatter import JSONFormatter

from dagster_taskiq_cancel.messages import Codec

EXECUTE_RUN = "dagster_taskiq_cancel.execute_run"
EXECUTE_STEP = "dagster_taskiq_cancel.execute_step"
# Run monitoring's resume of a STARTED run whose worker was lost: `dagster api resume_run`.
RESUME_RUN = "dagster_taskiq_cancel.resume_run"
# Each task's keyword arguments (all strings) and the only label it carries: the worker checks
# them before a slot is used, and taskiq must not see labels it acts on (``ack_type``, ``timeout``).
TASK_KWARGS: Mapping[str, frozenset[str]] = {
    EXECUTE_RUN: frozenset({"run_id"}),
    EXECUTE_STEP: frozenset({"run_id", "step_key", "attempt"}),
    RESUME_RUN: frozenset({"run_id", "attempt"}),
}
TASK_NAMES = frozenset(TASK_KWARGS)
TASK_LABELS = frozenset({"run_id", "mac"})
# Added by the receiving worker's broker after validation (never accepted from a sender): the
# queue the task came from, which admission compares with where its run storage routed it.
RECEIVED_FROM = "received_from"

# The executor's name, as Dagster records it in each run's execution plan: a run under it sends
# its steps as tasks (so its run process needs the signing keys, and routes each step itself).
EXECUTOR_NAME = "taskiq"

TAG_PREFIX = "dagster-taskiq/"
TASK_ID_TAG = f"{TAG_PREFIX}task_id"
QUEUE_TAG = f"{TAG_PREFIX}queue"
WORKER_ID_TAG = f"{TAG_PREFIX}worker_id"
CLAIM_TAG = f"{TAG_PREFIX}claim"
# A worker that stopped its run process for another to resume the run (fencing, scale-in).
RELEASED_TAG = f"{TAG_PREFIX}released_by"
# Tags for people only (the UI): what decides is in ``claims``. The launcher clears those a run
# carries from its parent (a re-execution, a retry) or its user, so that none misleads.
SHOWN_TAGS = (WORKER_ID_TAG, RELEASED_TAG)

_FORMATTER = JSONFormatter()


def step_task_id(run_id: str, step_key: str, attempt: int) -> str:
    """One id per (run, step, retry attempt): a redelivery of the same attempt is a duplicate."""
    return f"{run_id}:{step_key}:{attempt}"


@dataclass(frozen=True)
class TaskMessage:
    """A task ready to send: its id, the run it belongs to, and the SQS body."""

    task_id: str
    run_id: str
    body: str


def run_task_message(run_id: str, codec: Codec | None = None) -> TaskMessage:
    """The execute-run task for ``run_id`` (task id = run id)."""
    return _message(run_id, EXECUTE_RUN, run_id, {"run_id": run_id}, codec)


def resume_task_id(run_id: str, attempt: int) -> str:
    """One id per resume attempt: a redelivery of the same attempt is a duplicate."""
    return f"{run_id}-resume-{attempt}"


_RESUME_SUFFIX = re.compile(r"-resume-\d+$")


def run_id_of(task_id: str) -> str:
    """The run a task id (run, resume or step task) belongs to; Dagster's run ids hold no
    colon."""
    return _RESUME_SUFFIX.sub("", task_id.split(":", 1)[0])


def step_holder_tag(run_id: str, worker_id: str) -> str:
    """The tag a worker writes, for people and cancel hints, when it claims a step of the run:
    one per worker, not per step, so that a run's tags (read and rewritten whole by Dagster)
    stay as few as the workers that held its steps, however many steps it has."""
    return f"{CLAIM_TAG}/{run_id}:steps:{worker_id}"


def resume_task_message(run_id: str, attempt: int, codec: Codec | None = None) -> TaskMessage:
    """The resume-run task for attempt ``attempt`` (1, 2, ...) of run monitoring."""
    kwargs = {"run_id": run_id, "attempt": str(attempt)}
    return _message(resume_task_id(run_id, attempt), RESUME_RUN, run_id, kwargs, codec)


def step_task_message(
    run_id: str, step_key: str, attempt: int, codec: Codec | None = None
) -> TaskMessage:
    """The execute-step task for retry attempt ``attempt`` (0, 1, ...) of one step."""
    kwargs = {"run_id": run_id, "step_key": step_key, "attempt": str(attempt)}
    task_id = step_task_id(run_id, step_key, attempt)
    return _message(task_id, EXECUTE_STEP, run_id, kwargs, codec)


def task_message(
    run_id: str, step_key: str | None, attempt: int, resume: bool, codec: Codec | None = None
) -> TaskMessage:
    """The one message of a task, rebuilt from its ids (to send it again)."""
    if step_key is not None:
        return step_task_message(run_id, step_key, attempt, codec)
    if resume:
        return resume_task_message(run_id, attempt, codec)
    return run_task_message(run_id, codec)


def expected_task_id(task_name: str, kwargs: Mapping[str, str]) -> str | None:
    """The only id a task with these arguments may have (None: the arguments are invalid).

    Ids are derived from the arguments, so a message cannot pair one task's id (and its claim)
    with another task's arguments.
    """
    run_id = kwargs["run_id"]
    if task_name == EXECUTE_RUN:
        return run_id
    attempt = kwargs["attempt"]
    if not (attempt.isascii() and attempt.isdigit() and len(attempt) <= 6):
        return None
    if attempt != str(int(attempt)):
        return None  # one spelling per attempt: "07" would be a second id for attempt 7
    if task_name == RESUME_RUN:
        return resume_task_id(run_id, int(attempt)) if int(attempt) >= 1 else None
    return step_task_id(run_id, kwargs["step_key"], int(attempt))


def task_signing_payload(task_name: str, task_id: str, kwargs: Mapping[str, str]) -> str:
    """What a task's ``mac`` label signs: its name, id and arguments, canonically encoded."""
    return json.dumps([task_name, task_id, dict(sorted(kwargs.items()))], separators=(",", ":"))


def _message(
    task_id: str, task_name: str, run_id: str, kwargs: dict[str, str], codec: Codec | None
) -> TaskMessage:
    labels = {"run_id": run_id}
    mac = codec.mac(task_signing_payload(task_name, task_id, kwargs)) if codec else None
    if mac is not None:
        labels["mac"] = mac
    broker_message = _FORMATTER.dumps(
        TaskiqMessage(
            task_id=task_id,
            task_name=task_name,
            labels=labels,
            args=[],
            kwargs=kwargs,
        )
    )
    return TaskMessage(task_id=task_id, run_id=run_id, body=broker_message.message.decode())
