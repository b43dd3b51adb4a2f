"""What a worker writes into a run it holds, each write after re-reading the run.

The worker's view of a run may be seconds old; every write here reads the run again first, so
that nothing is written into a run that is gone or, for an ending, already ended.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dagster import DagsterEventType, DagsterInstance, DagsterRun
from dagster._core.events import DagsterEvent, EngineEventData, StepFailureData
from dagster._core.execution.plan.handle import StepHandle
from dagster._utils.error import SerializableErrorInfo

from dagster_taskiq_cancel import claims
from dagster_taskiq_cancel.tasks import RELEASED_TAG
from dagster_taskiq_cancel.worker.held import HeldTask


def note(
    instance: DagsterInstance,
    run_id: str,
    message: str,
    step_key: str | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> DagsterRun | None:
    """An engine event in the run, if it still exists; the run as re-read."""
    run = instance.get_run_by_id(run_id)
    if run is not None:
        data = EngineEventData(dict(metadata)) if metadata else None
        instance.report_engine_event(message, run, data, step_key=step_key)
    return run


def record_start(instance: DagsterInstance, worker_id: str, held: HeldTask) -> None:
    """Who runs the task, and as which pid."""
    what = f"step {held.step_key}" if held.step_key else "run"
    pid = held.process.pid
    note(
        instance,
        held.run_id,
        f"Worker {worker_id} started {what} task as pid {pid}.",
        held.step_key,
        {"worker_id": worker_id, "task_id": held.task_id, "pid": pid},
    )


def fail_task(
    instance: DagsterInstance,
    run_id: str,
    step_key: str | None,
    message: str,
    error: SerializableErrorInfo | None = None,
) -> None:
    """Fail work the worker took and will not finish: nobody else would (its message is
    deleted). A run fails; a step gets a STEP_FAILURE, which its run's executor handles as any
    step failure (a retry if the op has a policy)."""
    run = instance.get_run_by_id(run_id)
    if run is None or run.is_finished:
        return
    if step_key is None:
        instance.report_run_failed(run, message)
        return
    failure = StepFailureData(
        error=error or SerializableErrorInfo(message, [], "WorkerStoppedStep"),
        user_failure_data=None,
    )
    event = DagsterEvent(
        DagsterEventType.STEP_FAILURE.value,
        job_name=run.job_name,
        step_handle=StepHandle.parse_from_key(step_key),
        message=message,
        event_specific_data=failure,
    )
    instance.report_dagster_event(event, run_id)


def record_fence(instance: DagsterInstance, worker_id: str, held: HeldTask) -> None:
    """Say in the run why its task was killed, and hand the work on.

    A run resumed elsewhere is left to its new holder. A run nobody resumed yet is marked
    released, so that run monitoring sees it lost (``worker_health``) and resumes or fails it;
    a step is failed, so that its run's executor moves on.
    """
    message = f"Worker {worker_id} killed task {held.task_id}: {held.fenced_because}."
    if held.step_key is not None:
        fail_task(instance, held.run_id, held.step_key, message)
        return
    run = instance.get_run_by_id(held.run_id)
    if run is None or run.is_finished:
        return
    instance.report_engine_event(message, run)
    release(instance, worker_id, held.run_id, held.task_id)


def release(instance: DagsterInstance, worker_id: str, run_id: str, task_id: str) -> None:
    """Mark the run's task released by ``worker_id`` (``claims.release``, and a tag for people),
    unless the run was resumed elsewhere since: that task is its new holder's."""
    latest = claims.sent_of(instance, run_id)
    if latest is not None and latest.task_id == task_id:
        claims.release(instance, task_id, worker_id)
        instance.add_run_tags(run_id, {RELEASED_TAG: worker_id})
