"""Jobs the tests launch through the real launcher and real workers.

Ops record their pid and each execution in ``marker_dir`` so that tests can assert what really
ran and which process must be gone.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
from dagster._core.errors import DagsterExecutionInterruptedError

from dagster_taskiq_cancel import CleanupContext, cancellation_requested, cleanup_on_cancel


class MarkerConfig(dg.Config):
    marker_dir: str
    seconds: float = 0.0


def _record_start(context: dg.OpExecutionContext, marker_dir: str) -> None:
    directory = Path(marker_dir)
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / f"{context.run_id}.executions").open("a") as f:
        f.write(f"{os.getpid()}\n")
    (directory / f"{context.run_id}.pid").write_text(str(os.getpid()))


@dg.op
def sleeper(context: dg.OpExecutionContext, config: MarkerConfig) -> None:
    _record_start(context, config.marker_dir)
    deadline = time.monotonic() + config.seconds
    while time.monotonic() < deadline:
        time.sleep(0.05)


def _ignore_interrupts(context: dg.OpExecutionContext, seconds: float) -> None:
    """Sleep ``seconds``, ignoring Dagster's interrupt: only SIGKILL stops the caller."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            time.sleep(0.05)
        except DagsterExecutionInterruptedError:
            context.log.info("interrupted, ignoring it")


@dg.op
def stubborn(context: dg.OpExecutionContext, config: MarkerConfig) -> None:
    """Ignores Dagster's interrupt: only SIGKILL stops it."""
    _record_start(context, config.marker_dir)
    _ignore_interrupts(context, config.seconds)


@dg.op
def boom(context: dg.OpExecutionContext, config: MarkerConfig) -> None:
    _record_start(context, config.marker_dir)
    raise RuntimeError("boom")


@dg.job(executor_def=dg.in_process_executor)
def sleepy_job() -> None:
    sleeper()


def sleep_first_time(
    context: dg.OpExecutionContext, config: MarkerConfig, until: Path | None = None
) -> None:
    """Record the execution; sleep on the run's first one only (a resumed run finishes at once),
    and only until the file ``until`` exists, if given."""
    _record_start(context, config.marker_dir)
    executions = Path(config.marker_dir) / f"{context.run_id}.executions"
    if len(executions.read_text().splitlines()) > 1:
        return
    deadline = time.monotonic() + config.seconds
    while time.monotonic() < deadline and not (until and until.exists()):
        time.sleep(0.05)


@dg.op
def slow_first(context: dg.OpExecutionContext, config: MarkerConfig) -> None:
    sleep_first_time(context, config)


@dg.job(executor_def=dg.in_process_executor)
def slow_first_job() -> None:
    slow_first()


@dg.job(executor_def=dg.in_process_executor)
def stubborn_job() -> None:
    stubborn()


@dg.job(executor_def=dg.in_process_executor)
def failing_job() -> None:
    boom()


@dg.op
def polite(context: dg.OpExecutionContext, config: MarkerConfig) -> None:
    """Checks cancellation_requested() and stops the run itself inside the notice period."""
    _record_start(context, config.marker_dir)
    deadline = time.monotonic() + config.seconds
    while time.monotonic() < deadline:
        left = cancellation_requested()
        if left is not None:
            context.log.info(f"cancel pending, {left:.1f}s left: stopping cleanly")
            (Path(config.marker_dir) / f"{context.run_id}.polite").write_text(f"{left:.3f}")
            raise dg.DagsterExecutionInterruptedError()  # stop the run as the interrupt would
        time.sleep(0.05)


@dg.job(executor_def=dg.in_process_executor)
def polite_job() -> None:
    polite()


def flaky_cleanup(context: CleanupContext) -> None:
    """Fails on its first two attempts, then records that it ran."""
    marker = Path(os.environ["TEST_MARKER_DIR"]) / f"{context.run_id}.cleanup"
    with marker.open("a") as f:
        f.write(f"{context.attempt} {context.outcome}\n")
    if context.attempt < 3:
        raise RuntimeError(f"cleanup attempt {context.attempt} failed")


def broken_cleanup(context: CleanupContext) -> None:
    raise RuntimeError("the scratch bucket is gone")


@dg.job(
    executor_def=dg.in_process_executor,
    tags=cleanup_on_cancel(flaky_cleanup, attempts=3, backoff_seconds=0.1),
)
def flaky_cleanup_job() -> None:
    sleeper()


@dg.job(
    executor_def=dg.in_process_executor,
    tags=cleanup_on_cancel(broken_cleanup, attempts=2, backoff_seconds=0.1),
)
def broken_cleanup_job() -> None:
    sleeper()


@dg.op
def spawner(context: dg.OpExecutionContext, config: MarkerConfig) -> None:
    """Starts a helper process it never waits for, as careless op code does, then sleeps."""
    _record_start(context, config.marker_dir)
    helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    (Path(config.marker_dir) / f"{context.run_id}.helper").write_text(str(helper.pid))
    deadline = time.monotonic() + config.seconds
    while time.monotonic() < deadline:
        time.sleep(0.05)


@dg.op
def session_spawner(context: dg.OpExecutionContext, config: MarkerConfig) -> None:
    """Ignores the interrupt and starts a helper in a session of its own, out of the task's
    process group: only the guard, which tracks every descendant, can find it."""
    _record_start(context, config.marker_dir)
    helper = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True
    )
    (Path(config.marker_dir) / f"{context.run_id}.helper").write_text(str(helper.pid))
    _ignore_interrupts(context, config.seconds)


@dg.job(executor_def=dg.in_process_executor)
def session_spawner_job() -> None:
    session_spawner()


@dg.job  # Dagster's default executor: each op in its own multiprocessing step process
def multiprocess_job() -> None:
    sleeper()
    spawner()
