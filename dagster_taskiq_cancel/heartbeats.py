"""Worker heartbeats in the run storage, so Dagster's run monitoring can tell a dead worker.

One write per worker every few seconds (not one per run): the run's ``dagster-taskiq/worker_id``
tag says which worker holds it, and the launcher's ``check_run_worker_health`` compares that
worker's last heartbeat with ``heartbeat_timeout_seconds``.
"""

from __future__ import annotations

import time

from dagster import DagsterInstance, DagsterRun
from dagster._core.launcher import CheckRunHealthResult, WorkerStatus

from dagster_taskiq_cancel.tasks import TAG_PREFIX, WORKER_ID_TAG

_KEY = f"{TAG_PREFIX}heartbeat/"


def beat(instance: DagsterInstance, worker_id: str) -> None:
    instance.run_storage.set_cursor_values({_KEY + worker_id: repr(time.time())})


def worker_health(
    instance: DagsterInstance, run: DagsterRun, timeout_seconds: float
) -> CheckRunHealthResult:
    """RUNNING while the holding worker's heartbeat is fresh, FAILED once it is stale."""
    worker_id = run.tags.get(WORKER_ID_TAG)
    if worker_id is None:
        return CheckRunHealthResult(WorkerStatus.RUNNING, "no worker has claimed the run yet")
    last = instance.run_storage.get_cursor_values({_KEY + worker_id}).get(_KEY + worker_id)
    age = time.time() - float(last) if last else None
    if age is None or age > timeout_seconds:
        seen = f"{age:.0f}s ago" if age is not None else "never"
        return CheckRunHealthResult(
            WorkerStatus.FAILED,
            f"worker {worker_id} holding the run was last seen {seen} "
            f"(heartbeat_timeout_seconds={timeout_seconds:g})",
        )
    return CheckRunHealthResult(WorkerStatus.RUNNING)
