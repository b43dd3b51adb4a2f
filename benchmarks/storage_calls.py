"""Counting a worker's round trips to the run storage: each connection its calls open.

The poll runs on every busy worker of a fleet, so what it costs is counted where the storage
is reached: the run storage's ``connect`` and the sqlite event log's ``_connect`` (one per
query, on Dagster's storages: each call opens its own connection).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

from dagster import DagsterInstance


class StorageCalls:
    """Round trips so far, with when each was made (``time.monotonic``)."""

    def __init__(self) -> None:
        self.at: list[float] = []
        self._lock = threading.Lock()

    def note(self) -> None:
        with self._lock:
            self.at.append(time.monotonic())

    def between(self, start: float, end: float) -> int:
        with self._lock:
            return sum(start <= t < end for t in self.at)


@contextlib.contextmanager
def counted(instance: DagsterInstance) -> Iterator[StorageCalls]:
    """Count every connection ``instance``'s run and event log storages open meanwhile."""
    calls = StorageCalls()
    targets = [(instance.run_storage, "connect"), (instance.event_log_storage, "_connect")]
    patched = []
    for storage, name in targets:
        real = getattr(storage, name, None)
        if real is None:
            continue

        def counting(*args: Any, _real: Any = real, **kwargs: Any) -> Any:
            calls.note()
            return _real(*args, **kwargs)

        setattr(storage, name, counting)
        patched.append((storage, name))
    try:
        yield calls
    finally:
        for storage, name in patched:
            delattr(storage, name)
