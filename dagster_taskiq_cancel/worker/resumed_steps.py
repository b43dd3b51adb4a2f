"""A resumed run runs only the steps it had not finished, whatever Dagster executor it uses.

Dagster's multiprocess and in-process executors ignore ``resume_from_failure``: ``dagster api
resume_run`` would run every step again, including those that had succeeded before the run was
handed on. Dagster's step-delegating executors (``taskiq_executor`` among them) rebuild their
state from the run's event log instead (``ActiveExecution.rebuild_from_events``). Here the
other two do the same with the run's step events:

- a step that succeeded is done: its outputs (dynamic ones included) are read back by the IO
  manager from this same run, as for any later step (the workers must share the IO manager,
  DESIGN rule 9). A job with an output in memory (``mem_io_manager``, in-process executor only)
  has nothing to read back: every step runs again, as under Dagster;
- a step that failed by itself stays failed, and a step up for retry is retried, as Dagster
  would have done had the run not been handed on;
- a step that was running when the run was handed on (started but not finished, or failed by
  the interrupt that stopped its run process) runs again, as do the steps that had not begun.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from dagster import DagsterEvent, DagsterEventType, DagsterInstance
from dagster._core.events import EngineEventData
from dagster._core.execution.plan import active
from dagster._core.execution.plan.active import ActiveExecution
from dagster._core.execution.plan.objects import ErrorSource
from dagster._core.execution.plan.plan import can_isolate_steps
from dagster._core.execution.plan.step import ExecutionStep
from dagster._core.executor import multiprocess
from dagster._core.executor.in_process import InProcessExecutor

_STEP_EVENTS = {
    DagsterEventType.STEP_OUTPUT,
    DagsterEventType.STEP_SUCCESS,
    DagsterEventType.STEP_FAILURE,
    DagsterEventType.STEP_UP_FOR_RETRY,
}
Execute = Callable[[Any, Any, Any], Iterator[DagsterEvent]]


def _finished_events(instance: DagsterInstance, run_id: str) -> list[DagsterEvent]:
    """The run's step events, less failures by an interrupt (the hand-over: not finished)."""
    return [
        event
        for entry in instance.all_logs(run_id, of_type=_STEP_EVENTS)
        if (event := entry.dagster_event) is not None
        and not (
            event.is_step_failure and event.step_failure_data.error_source == ErrorSource.INTERRUPT
        )
    ]


class ResumedExecution(ActiveExecution):
    """Dagster's plan state, rebuilt from the run's events; unfinished steps start first."""

    def __init__(self, *args: Any, prior_events: Sequence[DagsterEvent], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._prior_events = prior_events
        self._restart: list[ExecutionStep] = []

    def __enter__(self) -> ResumedExecution:
        super().__enter__()
        # Steps that were ready and not finished come back "in flight": the executor must
        # launch them, as it launches what ``get_steps_to_execute`` returns.
        self._restart = list(self.rebuild_from_events(self._prior_events))
        return self

    def get_steps_to_execute(self, limit: int | None = None) -> Sequence[ExecutionStep]:
        count = len(self._restart) if limit is None else min(limit, len(self._restart))
        restart, self._restart = self._restart[:count], self._restart[count:]
        more = None if limit is None else limit - count
        return [*restart, *super().get_steps_to_execute(more)]


def _resuming(dagster_execute: Execute) -> Execute:
    """The executor's ``execute``, with its plan state rebuilt first when the run is resumed.

    The multiprocess executor names ``ActiveExecution`` in its module; the in-process one gets
    it from ``ExecutionPlan.start``, which imports it from ``active`` when called.
    """

    def execute(executor: Any, plan_context: Any, execution_plan: Any) -> Iterator[DagsterEvent]:
        if plan_context.resume_from_failure and not can_isolate_steps(
            plan_context.job.get_definition()
        ):
            yield DagsterEvent.engine_event(
                plan_context,
                "Resuming: every step runs again (an output of this job is kept in memory)",
                EngineEventData(),
            )
        elif plan_context.resume_from_failure:
            prior = _finished_events(plan_context.instance, plan_context.run_id)
            done = sorted({e.step_key for e in prior if e.is_step_success and e.step_key})
            yield DagsterEvent.engine_event(
                plan_context,
                f"Resuming: finished steps are not run again ({', '.join(done) or 'none'})",
                EngineEventData(),
            )
            resumed = functools.partial(ResumedExecution, prior_events=prior)
            multiprocess.ActiveExecution = resumed  # type: ignore[misc]
            active.ActiveExecution = resumed  # type: ignore[misc]
        yield from dagster_execute(executor, plan_context, execution_plan)

    return execute


def install() -> None:
    """Make this process's multiprocess and in-process executors resume from the event log."""
    for executor in (multiprocess.MultiprocessExecutor, InProcessExecutor):
        executor.execute = _resuming(executor.execute)  # type: ignore[method-assign]
