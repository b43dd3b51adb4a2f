"""Dagster child processes: started in their own process group, tied to the worker's life.

Dagster work runs as ``python -m dagster api ...`` in a child so that it can be stopped: SIGTERM
reaches Dagster's own interrupt handling (``capture_interrupts``), SIGKILL of the process group
ends whatever is left. Synchronous code in a thread of the worker could never be stopped.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import signal
import sys
from collections.abc import Mapping, Sequence

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _in_child() -> None:
    """Runs between fork and exec: new session (own group), and die with the worker."""
    os.setsid()
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


async def spawn(argv: Sequence[str], env: Mapping[str, str]) -> asyncio.subprocess.Process:
    """Start ``argv`` as the leader of a new process group that is killed if the worker dies."""
    return await asyncio.create_subprocess_exec(
        *argv, env=dict(env), preexec_fn=_in_child, stdin=asyncio.subprocess.DEVNULL
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
