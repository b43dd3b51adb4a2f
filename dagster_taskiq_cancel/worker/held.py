"""A task a worker holds: its child process and, once stopping, why and since when."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from dagster_taskiq_cancel.messages import CancelRequest


@dataclass
class HeldTask:
    """One task's child and its stop state; shared by the worker's loops and the records."""

    task_id: str
    run_id: str
    step_key: str | None
    process: asyncio.subprocess.Process
    tags: Mapping[str, str]
    cancel_file: Path
    request: CancelRequest | None = None
    stop_started_at: float | None = None
    cancel: bool = False  # stopping because the run was cancelled (not ended, not a drain)
    killed: bool = False
    before_start: bool = False  # killed before Dagster started the run: none of it ran
    start_checked: bool = False  # run task: event log checked for a cancel RUN_START overwrote
    ended_since: float | None = None  # when the run was first seen ended while this still ran
    fenced_because: str | None = None  # killed as another worker may run it now (fencing)
    handed_over: bool = False  # stopped at shutdown for run monitoring to resume (scale_in)
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    settled: asyncio.Event = field(default_factory=asyncio.Event)  # the run's record is written
