"""A blocking storage call that is tried again without ever running twice at once.

A storage call runs on a thread, which cannot be interrupted: a try the worker gave up waiting
for (a paused database) still completes once the storage answers. Its outcome then counts,
rather than a second copy queued behind it writing the same record twice. A new call is made
only once the previous one has ended.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, Generic, TypeVar

from dagster_taskiq_cancel import metrics

T = TypeVar("T")


class InFlight(Generic[T]):
    """``fn(*args, *more)`` on ``executor``, awaited at most ``timeout`` seconds per
    ``attempt``; ``more`` are an attempt's own arguments, read only when it makes a new call
    (a heartbeat's time and tasks)."""

    def __init__(self, executor: Executor, fn: Callable[..., T], *args: Any) -> None:
        self.executor = executor
        self.fn = fn
        self.args = args
        self.started_at: float | None = None  # time.monotonic() of the latest call made
        self._future: Future[T] | None = None

    async def attempt(self, timeout: float, *more: Any) -> T:
        """The call's result; raises its error, or ``TimeoutError`` while it still runs (the
        next attempt waits for that same call)."""
        if self._future is None:
            self.started_at = time.monotonic()
            self._future = self.executor.submit(self.fn, *self.args, *more)
        future = self._future
        waited = asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), timeout)
        try:
            result = await metrics.storage_call(self.fn, waited)
        except Exception:
            if not future.done():
                raise  # still running: the next attempt waits for this same call
            self._future = None
            if future.exception() is not None:
                raise  # it failed: the next attempt makes the call again
            return future.result()  # it succeeded just as the wait ran out
        self._future = None
        return result
