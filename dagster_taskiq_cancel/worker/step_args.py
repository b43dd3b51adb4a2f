"""A step's ``dagster api execute_step`` arguments, rebuilt from the run storage alone.

A step task names a run, a step key and a retry attempt, nothing else: its sender may be anyone
who can write to the queue. Everything Dagster's step child needs comes from the run's record
(job origin, run config), its event log (what the executor launched, the outputs and dynamic
mappings so far) and the worker's own instance, exactly as the run's executor would have sent it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dagster import DagsterEventType, DagsterInstance, DagsterRun
from dagster._core.execution.plan.state import KnownExecutionState
from dagster._core.execution.retries import RetryMode
from dagster._grpc.types import ExecuteStepArgs


def was_launched(
    instance: DagsterInstance, run_id: str, step_key: str, task_id: str, queue: str | None = None
) -> bool:
    """Whether the run's executor recorded sending ``task_id`` for ``step_key`` (to ``queue``,
    when given).

    The step handler writes this STEP_WORKER_STARTING event before it sends the task, so a real
    task always finds it; a forged one (another run, step, attempt or queue) never does.
    """
    records = instance.get_records_for_run(
        run_id, of_type=DagsterEventType.STEP_WORKER_STARTING
    ).records
    for record in records:
        event = record.event_log_entry.dagster_event
        if event is None or event.step_key != step_key:
            continue
        metadata = getattr(event.event_specific_data, "metadata", None) or {}
        sent = metadata.get("task_id")
        if getattr(sent, "value", sent) != task_id:
            continue
        sent_to = metadata.get("queue")
        if queue is None or getattr(sent_to, "value", sent_to) in (None, queue):
            return True
    return False


def _retry_mode(run_config: Mapping[str, Any]) -> RetryMode:
    """The executor's ``retries`` from the run config (Dagster's default: enabled), as a step
    sees it: retries are deferred to the run's executor, which sends the next attempt."""
    execution = run_config.get("execution") or {}
    config = execution.get("config")
    if config is None and len(execution) == 1:  # the older {executor_name: {config: ...}} form
        config = (next(iter(execution.values())) or {}).get("config")
    retries = (config or {}).get("retries") or {"enabled": {}}
    return RetryMode.from_config(retries).for_inner_plan()  # type: ignore[arg-type]


def step_args(
    instance: DagsterInstance, run: DagsterRun, step_key: str, attempt: int
) -> ExecuteStepArgs:
    """The arguments the run's executor gives ``step_key``, rebuilt from the run storage.

    Dagster derives the state of a run from its event log for re-execution; applied to the live
    run, the same derivation gives the outputs produced so far (``ready_outputs``) and the
    dynamic mappings, and its parent chain is the one the run started from.
    """
    derived = KnownExecutionState.build_for_reexecution(instance, run)
    this_run = derived.parent_state
    known_state = KnownExecutionState(
        previous_retry_attempts={step_key: attempt},
        dynamic_mappings=derived.dynamic_mappings,
        ready_outputs=set(this_run.produced_outputs) if this_run else set(),
        parent_state=this_run.get_parent_state() if this_run else None,
    )
    return ExecuteStepArgs(
        job_origin=run.job_code_origin,  # type: ignore[arg-type]
        run_id=run.run_id,
        step_keys_to_execute=[step_key],
        instance_ref=instance.get_ref(),
        retry_mode=_retry_mode(run.run_config),
        known_state=known_state,
        should_verify_step=True,
        print_serialized_events=False,
    )
