"""The worker's Dagster child: ``dagster api execute_run|resume_run|execute_step``, amended.

A resumed run runs only the steps it had not finished, under the multiprocess executor too
(``resumed_steps``). Two fixes correct Dagster behaviours that break a cancel, and act only once
a stop has begun:

- **A cancelled step is not retried** (``no_cancel_retry``, here and in each step process this
  child starts): interrupting the steps of a cancelled run must not put them up for retry.
- **An interrupt stops a step process that is still starting.** The multiprocess executor
  forwards an interrupt only to step processes that already exist, and waits for them; one it
  launches in the same moment never hears of it, and one still starting cannot act on it before
  its op begins, past the worker's grace. Here every step process of an interrupted executor
  gets its termination event, and is stopped at once if none of its user code has begun
  (``step_gate``).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

from dagster._cli import main as dagster_main
from dagster._core.execution.plan.active import ActiveExecution
from dagster._core.executor import multiprocess

from dagster_taskiq_cancel.worker import no_cancel_retry, resumed_steps, step_gate

_dagster_mark_interrupted = ActiveExecution.mark_interrupted
_dagster_execute_step_out_of_process = multiprocess.execute_step_out_of_process
_interrupted = False  # one run per process: the executor of this run was interrupted


def _mark_interrupted(self: ActiveExecution) -> None:
    global _interrupted
    _interrupted = True
    _dagster_mark_interrupted(self)


def _execute_step_out_of_process(
    multiproc_ctx: Any,
    recon_job: Any,
    step_context: Any,
    step: Any,
    errors: Any,
    processes: dict[str, Any],
    term_events: dict[str, Any],
    *rest: Any,
) -> Iterator[Any]:
    """Dagster's step launch, stopping the step process once the executor is interrupted."""
    launch = _dagster_execute_step_out_of_process(
        multiproc_ctx, recon_job, step_context, step, errors, processes, term_events, *rest
    )
    yield from step_gate.launch(
        launch, step_context, step.key, processes, term_events, lambda: _interrupted
    )


def main() -> None:
    no_cancel_retry.install()
    resumed_steps.install()
    ActiveExecution.mark_interrupted = _mark_interrupted  # type: ignore[method-assign]
    multiprocess.execute_step_out_of_process = _execute_step_out_of_process
    multiprocess.MultiprocessExecutorChildProcessCommand = step_gate.GatedStepCommand  # type: ignore[misc]
    sys.argv = ["dagster", "api", *sys.argv[1:]]
    dagster_main()


if __name__ == "__main__":
    main()
