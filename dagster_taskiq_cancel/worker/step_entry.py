"""The step child: Dagster's ``dagster api execute_step``, except that a cancel is not retried.

Dagster applies an op's RetryPolicy to interrupts (so that a preempted step runs again). When
the worker interrupts a step because its run was cancelled, that turns every running step into
STEP_UP_FOR_RETRY and makes the executor send retry attempts of a run that is stopping. The
worker writes the cancel deadline file before it interrupts a cancelled step
(``cancellation_requested()`` is then not None); while it exists, the step's retry mode reads
as disabled, so the interrupted step fails as the interrupt it is.
"""

from __future__ import annotations

import sys

from dagster._cli import main as dagster_main
from dagster._core.execution.context.system import StepExecutionContext
from dagster._core.execution.retries import RetryMode

from dagster_taskiq_cancel.cooperative import cancellation_requested

_dagster_retry_mode = StepExecutionContext.retry_mode


def _retry_mode(self: StepExecutionContext) -> RetryMode:
    mode = _dagster_retry_mode.fget(self)  # type: ignore[attr-defined]
    return RetryMode.DISABLED if cancellation_requested() is not None else mode


def main() -> None:
    StepExecutionContext.retry_mode = property(_retry_mode)  # type: ignore[method-assign,assignment]
    sys.argv = ["dagster", "api", "execute_step", *sys.argv[1:]]
    dagster_main()


if __name__ == "__main__":
    main()
