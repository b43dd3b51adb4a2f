"""How a held task is stopped once the authority says so: notice, SIGTERM, SIGKILL.

The decision to stop is the worker's (``authority`` says what the run storage means); this is
the escalation. The interrupt is Dagster's own (SIGTERM), so Dagster writes the run's end; only
a task that outlives its grace is SIGKILLed, through its guard, so that no descendant survives.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from dagster_taskiq_cancel.messages import Codec
from dagster_taskiq_cancel.settings import TaskiqCancelSettings
from dagster_taskiq_cancel.timing import finite_seconds, tag_seconds
from dagster_taskiq_cancel.worker import children
from dagster_taskiq_cancel.worker.held import HeldTask

logger = logging.getLogger(__name__)


def stop_seconds(held: HeldTask, name: str, settings: TaskiqCancelSettings, codec: Codec) -> float:
    """``notice_seconds`` or ``grace_seconds``: a signed cancel request's value, else the run
    tag's, else the setting.

    An unsigned request is only a hint (anyone who can send to the queue can forge it), so it
    never changes how a stop is timed.
    """
    trusted = held.request if held.request and codec.signed else None
    requested = getattr(trusted, name, None)
    if requested is not None:
        return finite_seconds(float(requested))  # the message model refuses inf and NaN
    return tag_seconds(held.tags, name, float(getattr(settings, name)))


async def interrupt(held: HeldTask, notice: float, grace: float) -> None:
    """Wait out the notice, SIGTERM, wait out the grace, SIGKILL: each only if still running."""
    if notice > 0 and await exits_within(held, notice):
        return
    children.signal_process(held.process.pid, signal.SIGTERM)
    if await exits_within(held, grace):
        return
    logger.warning("Task %s did not stop in %ss: SIGKILL", held.task_id, grace)
    await kill(held)


async def kill(held: HeldTask) -> None:
    """SIGKILL every process of the task through its guard, which also finds those that left
    the process group (a new session); the group directly if the guard hangs."""
    held.killed = True
    children.kill_all(held.process.pid)
    if not await exits_within(held, children.GUARD_KILL_SECONDS):
        logger.warning("Guard of task %s did not exit: SIGKILL of its group", held.task_id)
        children.kill_group(held.process.pid)


async def exits_within(held: HeldTask, seconds: float) -> bool:
    try:
        await asyncio.wait_for(held.exited.wait(), seconds)
    except asyncio.TimeoutError:  # not the builtin before Python 3.11
        return False
    return True
