"""Bulk cancel: select runs with one filter and cancel them all through ``cancel.py``.

QUEUED runs leave through the run coordinator (Dagster marks them CANCELED); runs already sent
to SQS or running get CANCELING first and then a hint, ten per SQS request, so that 1,000 runs
take seconds. Finished runs are reported as skipped and never touched.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

from dagster_taskiq_cancel.cancel import CancelOutcome, environment_user, request_cancels
from dagster_taskiq_cancel.queues import SyncQueues
from dagster_taskiq_cancel.settings import resolve_settings

DEFAULT_STATUSES: tuple[DagsterRunStatus, ...] = (
    DagsterRunStatus.QUEUED,
    DagsterRunStatus.NOT_STARTED,
    DagsterRunStatus.STARTING,
    DagsterRunStatus.STARTED,
)

# Not yet executing anywhere: cancelled before the runs that hold worker slots.
PENDING: frozenset[DagsterRunStatus] = frozenset(
    {DagsterRunStatus.QUEUED, DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING}
)


class EmptyFilterError(ValueError):
    """A bulk cancel without run ids, tags or job name would cancel every live run."""


@dataclass(frozen=True)
class BulkCancelResult:
    """Per-run outcomes of one bulk cancel, with counts for a summary line."""

    outcomes: list[CancelOutcome] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(outcome.error is None for outcome in self.outcomes)

    @property
    def by_status(self) -> Counter[str]:
        """Runs per status before the cancel (``missing`` for ids that matched no run)."""
        return Counter(
            o.status_before.value if o.status_before else "missing" for o in self.outcomes
        )

    @property
    def by_action(self) -> Counter[str]:
        return Counter(outcome.action for outcome in self.outcomes)

    @property
    def hints_unsent(self) -> int:
        """CANCELING recorded but the SQS hint failed: workers stop these at their next poll."""
        return sum(o.action == "canceling" and not o.hint_sent for o in self.outcomes)


def cancel_runs(
    instance: DagsterInstance,
    *,
    run_ids: Sequence[str] | None = None,
    tags: Mapping[str, str] | None = None,
    job_name: str | None = None,
    statuses: Sequence[DagsterRunStatus] | None = None,
    reason: str = "",
    requested_by: str | None = None,
    dry_run: bool = False,
) -> BulkCancelResult:
    """Cancel every run matching all the given criteria; ``requested_by`` defaults to the user.

    At least one of ``run_ids``, ``tags`` or ``job_name`` is required: a status alone would
    cancel everything live. Runs named in ``run_ids`` that the statuses leave out (finished
    ones) or that do not exist are reported as skipped, so a script can tell them apart.
    """
    if not (run_ids or tags or job_name):
        raise EmptyFilterError(
            "refusing to cancel without run ids, tags or a job name: that would cancel every "
            "live run"
        )
    selected = instance.get_runs(
        RunsFilter(
            run_ids=list(run_ids) if run_ids else None,
            tags=dict(tags or {}),
            job_name=job_name,
            statuses=list(statuses or DEFAULT_STATUSES),
        )
    )
    outcomes = _unselected(instance, run_ids or [], {run.run_id for run in selected})
    if dry_run:
        outcomes += [CancelOutcome(run.run_id, run.status, "would_cancel") for run in selected]
        return BulkCancelResult(outcomes)
    queues = SyncQueues(resolve_settings(instance, {}))
    who = requested_by or environment_user()
    # Runs not yet executing first: a slot freed by stopping a running run must not pick up
    # one of them before its CANCELING is recorded.
    pending = [run.run_id for run in selected if run.status in PENDING]
    running = [run.run_id for run in selected if run.status not in PENDING]
    outcomes += request_cancels(instance, queues, pending, reason, who)
    outcomes += request_cancels(instance, queues, running, reason, who)
    return BulkCancelResult(outcomes)


def _unselected(
    instance: DagsterInstance, run_ids: Sequence[str], selected: set[str]
) -> list[CancelOutcome]:
    """Named runs the filter left out (finished, other status, or unknown), as skipped."""
    others = [run_id for run_id in run_ids if run_id not in selected]
    if not others:
        return []
    found = {run.run_id: run.status for run in instance.get_runs(RunsFilter(run_ids=others))}
    return [CancelOutcome(run_id, found.get(run_id), "skipped") for run_id in others]
