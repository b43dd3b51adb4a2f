"""The taskiq tasks on the main queue: names, deterministic ids and message bodies.

Senders (launcher, step handler) live in synchronous Dagster code, so they build taskiq's wire
format here with taskiq's own JSON formatter and send it with boto3; the worker registers the
handlers under the same names.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from taskiq import TaskiqMessage
from taskiq.formatters.json_formatter import JSONFormatter

EXECUTE_RUN = "dagster_taskiq_cancel.execute_run"
EXECUTE_STEP = "dagster_taskiq_cancel.execute_step"
# Run monitoring's resume of a STARTED run whose worker was lost: `dagster api resume_run`.
RESUME_RUN = "dagster_taskiq_cancel.resume_run"
# Each task's keyword arguments (all strings) and the only label it carries: the worker checks
# them before a slot is used, and taskiq must not see labels it acts on (``ack_type``, ``timeout``).
TASK_KWARGS: Mapping[str, frozenset[str]] = {
    EXECUTE_RUN: frozenset({"run_id"}),
    EXECUTE_STEP: frozenset({"run_id", "step_key", "execute_step_args"}),
    RESUME_RUN: frozenset({"run_id", "attempt"}),
}
TASK_NAMES = frozenset(TASK_KWARGS)
TASK_LABELS = frozenset({"run_id"})

TAG_PREFIX = "dagster-taskiq/"
TASK_ID_TAG = f"{TAG_PREFIX}task_id"
QUEUE_TAG = f"{TAG_PREFIX}queue"
WORKER_ID_TAG = f"{TAG_PREFIX}worker_id"
CLAIM_TAG = f"{TAG_PREFIX}claim"
RESUME_SENT_TAG = f"{TAG_PREFIX}resume_sent_at"  # when the latest resume task was sent

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


def run_task_message(run_id: str) -> TaskMessage:
    """The execute-run task for ``run_id`` (task id = run id)."""
    return _message(run_id, EXECUTE_RUN, run_id, {"run_id": run_id})


def resume_task_id(run_id: str, attempt: int) -> str:
    """One id per resume attempt: a redelivery of the same attempt is a duplicate."""
    return f"{run_id}-resume-{attempt}"


def claim_tag(run_id: str, task_id: str) -> str:
    """The tag a worker writes when it claims the task: one for the run task, one per resume."""
    return CLAIM_TAG if task_id == run_id else f"{CLAIM_TAG}/{task_id}"


def resume_task_message(run_id: str, attempt: int) -> TaskMessage:
    """The resume-run task for attempt ``attempt`` (1, 2, ...) of run monitoring."""
    kwargs = {"run_id": run_id, "attempt": str(attempt)}
    return _message(resume_task_id(run_id, attempt), RESUME_RUN, run_id, kwargs)


def step_task_message(
    run_id: str, step_key: str, attempt: int, execute_step_args: str
) -> TaskMessage:
    """The execute-step task; ``execute_step_args`` is Dagster's serialized ExecuteStepArgs."""
    task_id = step_task_id(run_id, step_key, attempt)
    kwargs = {"run_id": run_id, "step_key": step_key, "execute_step_args": execute_step_args}
    return _message(task_id, EXECUTE_STEP, run_id, kwargs)


def _message(task_id: str, task_name: str, run_id: str, kwargs: dict[str, str]) -> TaskMessage:
    broker_message = _FORMATTER.dumps(
        TaskiqMessage(
            task_id=task_id,
            task_name=task_name,
            labels={"run_id": run_id},
            args=[],
            kwargs=kwargs,
        )
    )
    return TaskMessage(task_id=task_id, run_id=run_id, body=broker_message.message.decode())
