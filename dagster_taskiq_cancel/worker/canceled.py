"""The worker ends a cancelled run CANCELED itself once the run's process is gone.

When Dagster's run process cannot write the end (SIGKILLed after its grace, killed before it
started the run, or it exited without ending it), the run would stay CANCELING until the
reconciliation sensor read the worker's ack on its next tick, seconds later. The worker holds
the proof (the process is gone) and the run storage the authority (the cancel), so the worker
writes CANCELED at once; the sensor stays the fallback for a worker lost meanwhile, and finds
the run already CANCELED. Only a run still CANCELING, re-read just before the write, is ended
(DESIGN rule 6): whatever status anybody wrote meanwhile stands.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dagster import DagsterInstance, DagsterRun, DagsterRunStatus
from dagster._core.events import EngineEventData


def _still_canceling(instance: DagsterInstance, run_id: str) -> DagsterRun | None:
    run = instance.get_run_by_id(run_id)
    return run if run is not None and run.status == DagsterRunStatus.CANCELING else None


def what_stopped(task_id: str, returncode: int | None, before_start: bool, killed: bool) -> str:
    """What left the run unended, for the engine event."""
    if before_start:
        return f"task {task_id} was killed before Dagster started the run; none of it ran"
    if killed:
        return (
            f"the run process of task {task_id} did not stop within its grace and was killed "
            f"with SIGKILL (exit code {returncode})"
        )
    return f"the run process of task {task_id} exited (code {returncode}) without ending the run"


def record_canceled(
    instance: DagsterInstance,
    run_id: str,
    worker_id: str,
    what_happened: str,
    metadata: Mapping[str, Any],
) -> bool:
    """CANCELED, saying ``what_happened``; False if the run is no longer CANCELING.

    The status first, as it is what everybody waits for; the details follow as an engine event.
    """
    run = _still_canceling(instance, run_id)
    if run is None:
        return False
    instance.report_run_canceled(
        run,
        message=f"Worker {worker_id}: {what_happened}; recording CANCELED, as the cancel asked.",
    )
    instance.report_engine_event(
        f"Worker {worker_id} recorded CANCELED: {what_happened}.",
        run,
        EngineEventData({"worker_id": worker_id, **metadata}),
    )
    return True
