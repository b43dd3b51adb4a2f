"""A cancel never becomes a retry: Dagster's retry decision reads "disabled" in a cancelled run.

Dagster applies an op's RetryPolicy to interrupts (so that a preempted step runs again), and the
executors put a crashed or unhealthy step up for retry. In a run being cancelled either would
write ``STEP_UP_FOR_RETRY`` and, under a step-delegating executor, send a retry attempt of a run
that is stopping. Every such decision reads ``StepExecutionContext.retry_mode`` (in the step
process when the op raised, in the run process when a step process crashed or failed its health
check), so that property is wrapped in each of those processes (``install``): the run task's
child, each multiprocess step process and each ``execute_step`` child.

Whether the run is cancelled is asked in this order, each only if the one before said no:

1. the cancel deadline file (``cancellation_requested()``): the worker writes it before it
   interrupts cancelled work, so the usual case costs one ``stat`` and no storage call;
2. the run storage, the authority (DESIGN rule 1): the run is CANCELING or CANCELED, or its event
   log holds a cancel that RUN_START overwrote. This is what decides when the file could not be
   written (a full or wiped TMPDIR);
3. if the storage cannot be read, the retry is refused. The question only comes up after a
   failure, usually an interrupt, which on a worker means a stop: refusing costs at most one
   retry of a step that failed while both the file and the storage failed, whereas granting it
   would let two faults turn a cancel into a retry. One fault alone (no file, or one storage
   error with the file written) never does.

Dagster's own decision (the op's policy, the executor's ``retries`` config) stands for a run that
is not cancelled.
"""

from __future__ import annotations

import logging

from dagster import DagsterInstance
from dagster._core.execution.context.system import StepExecutionContext
from dagster._core.execution.retries import RetryMode

from dagster_taskiq_cancel.cooperative import cancellation_requested
from dagster_taskiq_cancel.worker.authority import cancel_recorded, is_cancelled

logger = logging.getLogger(__name__)
_dagster_retry_mode = StepExecutionContext.retry_mode


def run_cancelled(instance: DagsterInstance, run_id: str) -> bool:
    """Whether a retry in ``run_id`` would retry a cancel (True when that cannot be known)."""
    if cancellation_requested() is not None:
        return True
    try:
        run = instance.get_run_by_id(run_id)
        return run is None or is_cancelled(run.status) or cancel_recorded(instance, run_id)
    except Exception as exc:  # the storage cannot say: refuse the retry (docstring, 3.)
        logger.warning("Run %s: cannot read whether it is cancelled, no retry: %s", run_id, exc)
        return True


def _retry_mode(self: StepExecutionContext) -> RetryMode:
    mode: RetryMode = _dagster_retry_mode.fget(self)  # type: ignore[attr-defined]
    if mode.disabled or not run_cancelled(self.instance, self.run_id):
        return mode
    return RetryMode.DISABLED


def install() -> None:
    """Make this process's retry decisions refuse a retry in a cancelled run."""
    StepExecutionContext.retry_mode = property(_retry_mode)  # type: ignore[method-assign,assignment]
