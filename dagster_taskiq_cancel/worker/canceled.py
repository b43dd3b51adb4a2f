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


def record_canceled(
    instance: DagsterInstance,
    run_id: str,
    worker_id: str,
    what_happened: str,
    metadata: Mapping[str, Any],
) -> bool:
    """CANCELED with an engine event saying ``what_happened``; False if no longer CANCELING."""
    run = _still_canceling(instance, run_id)
    if run is None:
        return False
    instance.report_engine_event(
        f"Worker {worker_id}: {what_happened}; recording CANCELED now, as the cancel asked.",
        run,
        EngineEventData({"worker_id": worker_id, **metadata}),
    )
    run = _still_canceling(instance, run_id)
    if run is None:
        return False
    instance.report_run_canceled(run, message=f"Run canceled by worker {worker_id}.")
    return True
