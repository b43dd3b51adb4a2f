"""A multiprocess step process that has not begun its user code stops at once with its run.

Dagster's multiprocess executor, interrupted, sets each step process's termination event and
waits for the process to end. A step process reads that event only once its termination thread
runs, and Dagster then defers the interrupt until the first user code (``capture_interrupts``).
So while the step process starts (the interpreter, importing Dagster and the job's module,
opening the instance: seconds on a busy machine) nothing stops it, and the run process waits for
it past the worker's grace, to a SIGKILL of the whole run.

Here the interrupted run process also sends ``STOP_UNSTARTED`` (SIGUSR1, which Dagster leaves
alone) to each of its step processes, once. Until the step process enters its first user code
(resource init or the op: Dagster's ``raise_interrupts_as``), the signal ends the process at
once (its default action; then a handler that restores and re-sends it); the run process reads
that death as the step interrupted before it began (``launch``), and Dagster ends the run
CANCELED as for any interrupted step. From the first user code on the handler ignores it, and
Dagster's own interrupt reaches the op through the termination event, as always (a Python
handler, so processes the op starts still get the default). The switch is made before the step
process enters user code and the handler runs on its main thread: a step is either stopped
before any of its user code ran, or interrupted by Dagster, never both. Dying at once, rather
than raising Dagster's interrupt inside the step process, matters on a busy machine: a step
process winding Dagster down and exiting took from 1.6 s to over 5 s there.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

from dagster._core import errors
from dagster._core.events import DagsterEvent, EngineEventData
from dagster._core.executor.child_process_executor import ChildProcessCrashException
from dagster._core.executor.multiprocess import MultiprocessExecutorChildProcessCommand

from dagster_taskiq_cancel.worker import no_cancel_retry

STOP_UNSTARTED = signal.SIGUSR1
_dagster_raise_interrupts_as = errors.raise_interrupts_as
_begun = False  # one step per process: its first user code has started


def _stop_unstarted(signum: int, _frame: FrameType | None) -> None:
    """Die of the signal, as before the handler was set; ignore it once user code began."""
    if not _begun:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


@contextlib.contextmanager
def _raise_interrupts_as(error_cls: type[BaseException]) -> Iterator[None]:
    """Dagster's entry into user code (every user code boundary goes through it)."""
    global _begun
    _begun = True
    with _dagster_raise_interrupts_as(error_cls):
        yield


class GatedStepCommand(MultiprocessExecutorChildProcessCommand):
    """Dagster's step command, killed by ``STOP_UNSTARTED`` until its user code begins.

    Pickled by reference into the step process, so this module is imported there whatever the
    multiprocessing start method. It is the step process's only entry from the worker's child,
    so it also carries the rule that a cancel is never retried (``no_cancel_retry``): the op's
    RetryPolicy is applied in the step process, where the run process's patches do not reach.
    """

    def execute(self) -> Iterator[DagsterEvent]:
        no_cancel_retry.install()
        errors.raise_interrupts_as = _raise_interrupts_as  # type: ignore[assignment]
        signal.signal(STOP_UNSTARTED, _stop_unstarted)
        yield from super().execute()


def launch(
    dagster_launch: Iterator[Any],
    step_context: Any,
    step_key: str,
    processes: dict[str, Any],
    term_events: dict[str, Any],
    interrupted: Callable[[], bool],
) -> Iterator[Any]:
    """Dagster's launch of one step process, in the run process, stopping it once interrupted.

    The termination event is set too for a step process launched while the executor handled
    the interrupt (the executor sets it only for those it already knew), so that a step that
    had begun its op is interrupted by Dagster's own way in every case.
    """
    process = None
    signalled = False
    try:
        for item in dagster_launch:
            process = processes.get(step_key, process)
            if interrupted() and process is not None and not signalled:
                signalled = True
                if not term_events[step_key].is_set():
                    term_events[step_key].set()
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, STOP_UNSTARTED)
            yield item
    except ChildProcessCrashException as crash:
        if not signalled or crash.exit_code != -STOP_UNSTARTED:
            raise
        yield DagsterEvent.engine_event(
            step_context,
            f"Step process for {step_key} (pid {crash.pid}) stopped by the interrupt while it "
            "was starting, before any of its user code ran.",
            EngineEventData(),
        )
