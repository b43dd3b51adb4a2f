"""How long a stop of a run may take: its notice and grace, from its run tags or the settings.

The sensor needs the same numbers as the worker that stops the run, so that it never calls a
run CANCELED while the worker is still inside the notice or grace it was told to give.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

from dagster_taskiq_cancel.settings import TaskiqCancelSettings
from dagster_taskiq_cancel.tasks import TAG_PREFIX

logger = logging.getLogger(__name__)

# A stop may not last past a day: a run must stay stoppable. Infinite and NaN values are no
# deadline at all, so they are ignored rather than clamped.
MAX_STOP_SECONDS = 24 * 3600.0


def finite_seconds(value: float) -> float:
    """``value`` clamped to [0, MAX_STOP_SECONDS] (the caller has checked it is finite)."""
    return min(max(value, 0.0), MAX_STOP_SECONDS)


def tag_seconds(tags: Mapping[str, str], name: str, default: float) -> float:
    """The run tag ``dagster-taskiq/<name>`` in seconds, finite and clamped; else ``default``."""
    raw = tags.get(f"{TAG_PREFIX}{name}")
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        logger.warning("Ignoring run tag %s%s=%r: not a finite number", TAG_PREFIX, name, raw)
        return default
    return finite_seconds(value)


def stop_seconds(tags: Mapping[str, str], settings: TaskiqCancelSettings) -> float:
    """Notice plus grace of a run's stop: the longest a worker takes to reach SIGKILL."""
    return tag_seconds(tags, "notice_seconds", settings.notice_seconds) + tag_seconds(
        tags, "grace_seconds", settings.grace_seconds
    )
