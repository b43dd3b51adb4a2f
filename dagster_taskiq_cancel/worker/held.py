"""A task a worker holds: its child process, its stop state, and where it is in its life."""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from dagster_taskiq_cancel.messages import CancelRequest


class Phase(enum.IntEnum):
    """A task's life after admission; it only moves forward, along ``_NEXT``.

    The worker answers for a task until it is DONE: an EXITED task's run still lacks its record
    (its settle is retried until the run storage answers), and a RELEASED run task (fenced off
    for lost storage) is watched for a cancel that lands after the release.
    """

    RUNNING = 1  # its child runs: polled, stopped, fenced (``Worker.held``)
    EXITED = 2  # its child is gone; the run's record is not written yet (``settle``, retried)
    RELEASED = 3  # a fenced run task, recorded and released: watched until run monitoring acts
    SETTLED = 4  # the run's record is written; its cleanup and ack follow
    DONE = 5  # nothing more to write or send


_NEXT: Mapping[Phase, frozenset[Phase]] = {
    Phase.RUNNING: frozenset({Phase.EXITED}),
    Phase.EXITED: frozenset({Phase.RELEASED, Phase.SETTLED}),
    Phase.RELEASED: frozenset({Phase.SETTLED, Phase.DONE}),
    Phase.SETTLED: frozenset({Phase.DONE}),
    Phase.DONE: frozenset(),
}


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
    returncode: int | None = None  # the child's, once EXITED
    phase: Phase = Phase.RUNNING
    _reached: dict[Phase, asyncio.Event] = field(
        default_factory=lambda: {phase: asyncio.Event() for phase in Phase}
    )

    def advance(self, phase: Phase) -> None:
        """Move on to ``phase``; anything but a step along ``_NEXT`` is a bug."""
        if phase not in _NEXT[self.phase]:
            raise RuntimeError(f"task {self.task_id}: {self.phase.name} -> {phase.name}")
        self.phase = phase
        for reached in Phase:
            if reached <= phase:
                self._reached[reached].set()

    @property
    def exited(self) -> asyncio.Event:
        """Set once every process of the task is gone."""
        return self._reached[Phase.EXITED]

    @property
    def settled(self) -> asyncio.Event:
        """Set once the run's record is written (released, or settled)."""
        return self._reached[Phase.RELEASED]
