"""Dagster child processes: started under a guard in their own session, tied to the worker's life.

Dagster work runs as ``python -m dagster api ...`` in a child so that it can be stopped: SIGTERM
reaches Dagster's own interrupt handling (``capture_interrupts``), SIGKILL of the process group
ends whatever is left. Synchronous code in a thread of the worker could never be stopped.

The child runs under ``guard.py``, which leads the session and process group: the pid the worker
holds is the guard's, SIGTERM/SIGINT sent to it reach the Dagster child, and when the worker dies
(SIGKILL included) or sends it ``KILL_ALL`` the guard kills every process of the task, however
deep and in whatever session.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from dagster_taskiq_cancel.worker.guard import KILL_ALL

GUARD = str(Path(__file__).with_name("guard.py"))
# The guard's kill takes milliseconds; one still alive after this is passed by (``kill_group``).
GUARD_KILL_SECONDS = 3.0


def guarded_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` under the guard; ``-I -S``: the guard needs only the standard library."""
    return [sys.executable, "-I", "-S", GUARD, str(os.getpid()), "--", *argv]


async def spawn(argv: Sequence[str], env: Mapping[str, str]) -> asyncio.subprocess.Process:
    """Start ``argv`` under the guard, which leads a new session and dies with the worker."""
    return await asyncio.create_subprocess_exec(
        *guarded_argv(argv),
        env=dict(env),
        start_new_session=True,
        stdin=asyncio.subprocess.DEVNULL,
    )


def dagster_api_argv(command: str, *args: str) -> list[str]:
    """``dagster api <command> ...`` with the worker's interpreter, through ``dagster_child``."""
    return [sys.executable, "-m", "dagster_taskiq_cancel.worker.dagster_child", command, *args]


def signal_process(pid: int, signum: int) -> bool:
    """Send ``signum`` to one process; False when it is already gone."""
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        return False
    return True


def kill_group(pgid: int) -> bool:
    """SIGKILL every process left in the group; False when none was left."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True


def kill_all(guard_pid: int) -> bool:
    """Have the guard SIGKILL every process of its task, itself last; False when it is gone."""
    return signal_process(guard_pid, KILL_ALL)
