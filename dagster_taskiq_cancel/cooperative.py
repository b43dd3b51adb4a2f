"""``cancellation_requested()``: op code asks, without a network call, whether a stop is coming.

During a cancel's notice period the worker writes the interrupt deadline (epoch seconds) to a
file whose path it gave the child in ``DAGSTER_TASKIQ_CANCEL_FILE``; checking is one ``stat``
when nothing is pending.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

CANCEL_FILE_ENV = "DAGSTER_TASKIQ_CANCEL_FILE"


def cancellation_requested() -> float | None:
    """Seconds left before the interrupt when a cancel is pending, else None.

    Returns None outside our workers (for example under ``materialize()`` in a unit test).
    """
    path = os.environ.get(CANCEL_FILE_ENV)
    if not path:
        return None
    try:
        deadline = float(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return max(0.0, deadline - time.time())


def announce(path: Path, deadline: float) -> None:
    """Publish the interrupt deadline atomically, so a reader never sees half a number."""
    partial = path.with_suffix(".tmp")
    partial.write_text(repr(deadline))
    partial.replace(path)
