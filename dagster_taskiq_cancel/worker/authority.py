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
from dataclasses import dataclass

import sqlalchemy as db
from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus
from dagster._core.storage.runs.schema import KeyValueStoreTable, RunsTable

from dagster_taskiq_cancel import claims

CANCELLED: frozenset[DagsterRunStatus] = frozenset(
    {DagsterRunStatus.CANCELING, DagsterRunStatus.CANCELED}
)
ENDED: frozenset[DagsterRunStatus] = frozenset({DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE})
# A run task may start only from these; anything else means another worker already has it.
RUN_STARTABLE: frozenset[DagsterRunStatus] = frozenset(
    {DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING}
)
_CANCEL_EVENTS = {DagsterEventType.RUN_CANCELING, DagsterEventType.RUN_CANCELED}


@dataclass(frozen=True)
class HeldRun:
    """What the poll reads of a held run: its status, and the task last sent for it (a run
    task whose run was sent again as another task was resumed elsewhere)."""

    status: DagsterRunStatus
    sent: claims.Sent | None


def held_runs(instance: DagsterInstance, run_ids: Collection[str]) -> Mapping[str, HeldRun | None]:
    """Every run in ``run_ids`` with its ``sent/`` row, in ONE round trip to the run storage
    (the runs table joined to the key-value table); None for a run that no longer exists.

    The poll runs on every busy worker of the fleet: one query, and only the two columns it
    needs (no run body to deserialise).
    """
    if not run_ids:
        return {}
    runs, kvs = RunsTable.c, KeyValueStoreTable.c
    query = (
        db.select(runs.run_id, runs.status, kvs.value)
        .select_from(
            RunsTable.outerjoin(KeyValueStoreTable, kvs.key == claims.sent_key_sql(runs.run_id))
        )
        .where(runs.run_id.in_(list(run_ids)))
    )
    rows = claims.sql_storage(instance).fetchall(query)
    found = {
        row["run_id"]: HeldRun(
            DagsterRunStatus(row["status"]),
            claims.parse_sent(row["value"]) if row["value"] else None,
        )
        for row in rows
    }
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
