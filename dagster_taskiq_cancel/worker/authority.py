"""The run storage is the authority: what a worker may do with the work it holds.

Queue messages are only hints that make a worker ask sooner; nothing is stopped or skipped
unless the run storage says so. Two kinds of "no longer live" must not be confused:

- **cancelled** (CANCELING or CANCELED): somebody asked to stop; the worker interrupts the work,
  acknowledges, and runs cleanup handlers;
- **ended** (SUCCESS or FAILURE): the run finished, usually by itself, and its processes are
  exiting; the worker leaves them alone for a grace period and never treats them as cancelled.

The status alone can lie once: Dagster's run process writes RUN_START after reading the status,
so a cancel recorded in between is overwritten (last write wins). A run task's event log is
therefore checked once when its run turns STARTED (``cancel_recorded``).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from dagster import DagsterEventType, DagsterInstance, DagsterRun, DagsterRunStatus, RunsFilter

CANCELLED: frozenset[DagsterRunStatus] = frozenset(
    {DagsterRunStatus.CANCELING, DagsterRunStatus.CANCELED}
)
ENDED: frozenset[DagsterRunStatus] = frozenset({DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE})
# A run task may start only from these; anything else means another worker already has it.
RUN_STARTABLE: frozenset[DagsterRunStatus] = frozenset(
    {DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING}
)
_CANCEL_EVENTS = {DagsterEventType.RUN_CANCELING, DagsterEventType.RUN_CANCELED}


def held_runs(
    instance: DagsterInstance, run_ids: Collection[str]
) -> Mapping[str, DagsterRun | None]:
    """Every run in ``run_ids`` in one query; None for a run that no longer exists."""
    if not run_ids:
        return {}
    found = {run.run_id: run for run in instance.get_runs(RunsFilter(run_ids=list(run_ids)))}
    return {run_id: found.get(run_id) for run_id in run_ids}


def is_cancelled(status: DagsterRunStatus | None) -> bool:
    return status in CANCELLED


def has_ended(status: DagsterRunStatus | None) -> bool:
    """Finished by itself (or deleted): its work must be left to exit, not cancelled."""
    return status is None or status in ENDED


def cancel_recorded(instance: DagsterInstance, run_id: str) -> bool:
    """Whether the run's event log holds a cancel, whatever its status says now."""
    return bool(instance.get_records_for_run(run_id, of_type=_CANCEL_EVENTS, limit=1).records)


def run_started(instance: DagsterInstance, run_id: str) -> bool:
    """Whether Dagster's run process has written RUN_START (and can no longer overwrite)."""
    records = instance.get_records_for_run(run_id, of_type=DagsterEventType.RUN_START, limit=1)
    return bool(records.records)
