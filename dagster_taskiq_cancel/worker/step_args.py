"""A step's ``dagster api execute_step`` arguments, rebuilt from the run storage alone.

A step task names a run, a step key and a retry attempt, nothing else: its sender may be anyone
who can write to the queue. Everything Dagster's step child needs comes from the run's record
(job origin, run config), the step's launch record (``claims.launch_of``: the state the
executor gave the step) and the worker's own instance, exactly as the run's executor sent it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dagster import DagsterInstance, DagsterRun
from dagster._core.execution.plan.state import KnownExecutionState
from dagster._core.execution.retries import RetryMode
from dagster._grpc.types import ExecuteStepArgs
from dagster._serdes import deserialize_value

from dagster_taskiq_cancel.claims import Launch


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
    instance: DagsterInstance, run: DagsterRun, step_key: str, launch: Launch
) -> ExecuteStepArgs:
    """The arguments the run's executor gave ``step_key``, as its launch record holds them.

    The state the step starts from (its inputs' outputs, the dynamic mappings, its retry count,
    the parent runs) is the executor's own, written before it sent the task: one row, however
    many steps the run has.
    """
    return ExecuteStepArgs(
        job_origin=run.job_code_origin,  # type: ignore[arg-type]
        run_id=run.run_id,
        step_keys_to_execute=[step_key],
        instance_ref=instance.get_ref(),
        retry_mode=_retry_mode(run.run_config),
        known_state=deserialize_value(launch.known_state, KnownExecutionState),
        should_verify_step=True,
        print_serialized_events=False,
    )
