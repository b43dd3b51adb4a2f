"""The run storage is the authority: which held work may go on, asked in one query.

Queue messages are only hints that make a worker ask sooner; nothing is stopped or skipped
unless the run storage says its run is no longer live.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

# A run or step task stops (or never starts) once its run is in one of these.
NOT_LIVE: frozenset[DagsterRunStatus] = frozenset(
    {
        DagsterRunStatus.CANCELING,
        DagsterRunStatus.CANCELED,
        DagsterRunStatus.FAILURE,
        DagsterRunStatus.SUCCESS,
    }
)
# A run task may start only from these; anything else means another worker already has it.
RUN_STARTABLE: frozenset[DagsterRunStatus] = frozenset(
    {DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING}
)


def run_statuses(
    instance: DagsterInstance, run_ids: Collection[str]
) -> Mapping[str, DagsterRunStatus | None]:
    """Status of every run in ``run_ids`` in one query; None for a run that no longer exists."""
    if not run_ids:
        return {}
    found = {run.run_id: run.status for run in instance.get_runs(RunsFilter(run_ids=list(run_ids)))}
    return {run_id: found.get(run_id) for run_id in run_ids}


def is_live(status: DagsterRunStatus | None) -> bool:
    return status is not None and status not in NOT_LIVE
