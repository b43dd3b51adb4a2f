"""Worker heartbeats in the run storage, so Dagster's run monitoring can tell a dead worker.

One write per worker every few seconds (not one per run): the run's ``dagster-taskiq/worker_id``
tag says which worker holds it, and the launcher's ``check_run_worker_health`` compares that
worker's last heartbeat with ``heartbeat_timeout_seconds``; the step handler's health check does
the same for the worker named in a step task's claim.
"""

from __future__ import annotations

import time

from dagster import DagsterInstance, DagsterRun
from dagster._core.launcher import CheckRunHealthResult, WorkerStatus

from dagster_taskiq_cancel.tasks import (
    RELEASED_TAG,
    RESUME_SENT_TAG,
    TAG_PREFIX,
    TASK_ID_TAG,
    WORKER_ID_TAG,
    claim_tag,
)

_KEY = f"{TAG_PREFIX}heartbeat/"


def beat(instance: DagsterInstance, worker_id: str) -> None:
    instance.run_storage.set_cursor_values({_KEY + worker_id: repr(time.time())})


def worker_health(
    instance: DagsterInstance, run: DagsterRun, timeout_seconds: float
) -> CheckRunHealthResult:
    """RUNNING while the holding worker's heartbeat is fresh, FAILED once it is stale.

    After a resume, the lost worker's tag stays until a worker claims the resume task: while
    that task waits in SQS (up to run monitoring's start timeout) the run is not lost again,
    so run monitoring does not send a second resume that could run beside the first.
    """
    task_id = run.tags.get(TASK_ID_TAG, run.run_id)
    sent = run.tags.get(RESUME_SENT_TAG)
    if sent and claim_tag(run.run_id, task_id) not in run.tags:
        waited = time.time() - float(sent)
        if waited < instance.run_monitoring_start_timeout_seconds:
            return CheckRunHealthResult(
                WorkerStatus.RUNNING, f"resume task {task_id} sent {waited:.0f}s ago, not taken yet"
            )
        return CheckRunHealthResult(
            WorkerStatus.FAILED,
            f"no worker took resume task {task_id} within {waited:.0f}s "
            f"(run_monitoring.start_timeout_seconds="
            f"{instance.run_monitoring_start_timeout_seconds:g})",
        )
    worker_id = run.tags.get(WORKER_ID_TAG)
    if worker_id is None:
        return CheckRunHealthResult(WorkerStatus.RUNNING, "no worker has claimed the run yet")
    if run.tags.get(RELEASED_TAG) == worker_id:
        return CheckRunHealthResult(
            WorkerStatus.FAILED,
            f"worker {worker_id} released the run: it stopped the run process (it lost the "
            "run storage, or it shut down; see the run's events)",
        )
    stale = staleness(instance, worker_id, timeout_seconds)
    if stale is not None:
        return CheckRunHealthResult(
            WorkerStatus.FAILED, f"worker {worker_id} holding the run was {stale}"
        )
    return CheckRunHealthResult(WorkerStatus.RUNNING)


def staleness(instance: DagsterInstance, worker_id: str, timeout_seconds: float) -> str | None:
    """Why ``worker_id`` counts as dead ("last seen ..."); None while its heartbeat is fresh."""
    age = seconds_since_beat(instance, worker_id)
    if age is not None and age <= timeout_seconds:
        return None
    seen = f"{age:.0f}s ago" if age is not None else "never"
    return f"last seen {seen} (heartbeat_timeout_seconds={timeout_seconds:g})"


def seconds_since_beat(instance: DagsterInstance, worker_id: str) -> float | None:
    """How long ago ``worker_id`` last wrote its heartbeat; None if it never did."""
    last = instance.run_storage.get_cursor_values({_KEY + worker_id}).get(_KEY + worker_id)
    return time.time() - float(last) if last else None
