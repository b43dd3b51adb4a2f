"""Runs a job's cleanup handler after its task was stopped: own process, retries, backoff."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sys
from collections.abc import Mapping

from dagster_taskiq_cancel.cleanup import (
    CLEANUP_ATTEMPTS_TAG,
    CLEANUP_BACKOFF_TAG,
    CLEANUP_TAG,
    CleanupContext,
    context_json,
)

logger = logging.getLogger(__name__)

ATTEMPT_TIMEOUT_SECONDS = 300.0
_ERROR_TAIL = 2000


async def run_cleanup(context: CleanupContext, env: Mapping[str, str]) -> str | None:
    """Run the handler named in the run's tags, if any; None on success, else the last error."""
    path = context.tags.get(CLEANUP_TAG)
    if not path:
        return None
    try:
        attempts = max(1, int(context.tags.get(CLEANUP_ATTEMPTS_TAG, "1")))
        backoff = max(0.0, float(context.tags.get(CLEANUP_BACKOFF_TAG, "0")))
    except ValueError:
        attempts, backoff = 1, 0.0
    error = None
    for attempt in range(1, attempts + 1):
        error = await _attempt(path, dataclasses.replace(context, attempt=attempt), env)
        if error is None:
            logger.info(
                "Cleanup %s for run %s succeeded (attempt %d)", path, context.run_id, attempt
            )
            return None
        logger.warning("Cleanup %s attempt %d/%d failed: %s", path, attempt, attempts, error)
        if attempt < attempts:
            await asyncio.sleep(backoff * 2 ** (attempt - 1))  # retry backoff, not synchronisation
    return error


async def _attempt(path: str, context: CleanupContext, env: Mapping[str, str]) -> str | None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dagster_taskiq_cancel.cleanup",
        path,
        context_json(context),
        env=dict(env),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, stderr = await asyncio.wait_for(proc.communicate(), ATTEMPT_TIMEOUT_SECONDS)
    except asyncio.TimeoutError:  # not the builtin before Python 3.11
        proc.kill()
        await proc.wait()
        return f"timed out after {ATTEMPT_TIMEOUT_SECONDS:.0f}s"
    if proc.returncode == 0:
        return None
    text = stderr.decode(errors="replace").strip()
    return text[-_ERROR_TAIL:] or f"exit code {proc.returncode}"
