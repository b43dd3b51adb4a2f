"""Worker heartbeats in the run storage, so Dagster's run monitoring can tell a lost task.

One write per worker every few seconds (not one per run): the time and the ids of the tasks the
worker holds (admitting or running). A task is healthy while the worker that claimed it
(``claims``) beats and its beat lists the task: a live worker whose task's process died while
its run could not be settled (a storage error) no longer lists it, and the task counts as lost.
The launcher's ``check_run_worker_health`` asks this about the run's task, the step handler's
health check about a step's task, the sensor about a CANCELING run's holder.

One row per worker boot, so rows must go: a worker writes its row before anything can name it
(its hint queue, a claim) and deletes it when it exits cleanly; a dead worker's row goes once
nothing needs it any more (``worker.sweep``). A missing row reads as a dead worker.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import sqlalchemy as db
from dagster import DagsterInstance, DagsterRun
from dagster._core.launcher import CheckRunHealthResult, WorkerStatus
from dagster._core.storage.runs.schema import KeyValueStoreTable

from dagster_taskiq_cancel import claims
from dagster_taskiq_cancel.tasks import TAG_PREFIX

_KEY = f"{TAG_PREFIX}heartbeat/"


@dataclass(frozen=True)
class Beat:
    """A worker's last heartbeat: when (its clock), the tasks it held then, and the name of
    its hint queue (for the sweep; empty in rows of earlier versions)."""

    at: float
    tasks: frozenset[str]
    queue: str = ""


def beat(instance: DagsterInstance, worker_id: str, last: Beat) -> None:
    """Write the heartbeat; its tasks must be read after its time (``Worker.holding``), so that
    a beat never misses a task claimed before its time."""
    value = json.dumps({"at": last.at, "tasks": sorted(last.tasks), "queue": last.queue})
    instance.run_storage.set_cursor_values({_KEY + worker_id: value})


def last_beat(instance: DagsterInstance, worker_id: str) -> Beat | None:
    """``worker_id``'s last heartbeat; None if it has no row (never beat, or gone)."""
    raw = instance.run_storage.get_cursor_values({_KEY + worker_id}).get(_KEY + worker_id)
    return parse(raw) if raw else None


def parse(raw: str) -> Beat:
    value = json.loads(raw)
    return Beat(float(value["at"]), frozenset(value["tasks"]), str(value.get("queue", "")))


def forget(instance: DagsterInstance, worker_id: str, only_if: str | None = None) -> bool:
    """Delete ``worker_id``'s row; with ``only_if``, only while it still holds that value (a
    compare-and-delete: a beat written since keeps its row). True if a row was deleted."""
    table = KeyValueStoreTable
    where = table.c.key == _KEY + worker_id
    if only_if is not None:
        where = db.and_(where, table.c.value == only_if)
    with claims.sql_storage(instance).connect() as conn:
        return conn.execute(table.delete().where(where)).rowcount > 0


def rows_after(instance: DagsterInstance, worker_id: str, limit: int) -> list[tuple[str, str]]:
    """Up to ``limit`` (worker id, raw beat) rows following ``worker_id``'s key in key order,
    going round to the first rows at the end (at most two bounded queries, whatever the number
    of rows)."""
    table = KeyValueStoreTable
    mine = table.c.key.like(_KEY + "%")

    def page(after: str | None, count: int) -> list[tuple[str, str]]:
        query = db.select(table.c.key, table.c.value).where(mine)
        if after is not None:
            query = query.where(table.c.key > after)
        with claims.sql_storage(instance).connect() as conn:
            found = conn.execute(query.order_by(table.c.key).limit(count)).fetchall()
        return [(key[len(_KEY) :], value) for key, value in found]

    rows = page(_KEY + worker_id, limit)
    if len(rows) < limit:
        seen = {key for key, _ in rows}
        rows += [row for row in page(None, limit - len(rows)) if row[0] not in seen]
    return rows


def worker_health(
    instance: DagsterInstance, run: DagsterRun, timeout_seconds: float
) -> CheckRunHealthResult:
    """RUNNING while the worker that claimed the run's current task holds it, else FAILED.

    After a resume, the task is the resume task: while it waits in SQS unclaimed (up to run
    monitoring's start timeout) the run is not lost again, so that run monitoring does not send
    a second resume that could run beside the first.
    """
    sent = claims.sent_of(instance, run.run_id)
    task_id = sent.task_id if sent else run.run_id
    claim = claims.claim_of(instance, task_id)
    if claim is None:
        if sent is None or task_id == run.run_id:
            return CheckRunHealthResult(WorkerStatus.RUNNING, "no worker has claimed the run yet")
        waited = time.time() - sent.at
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
    if claims.released_by(instance, task_id) == claim.worker_id:
        return CheckRunHealthResult(
            WorkerStatus.FAILED,
            f"worker {claim.worker_id} released the run: it stopped the run process (it lost "
            "the run storage, or it shut down; see the run's events)",
        )
    lost = why_lost(instance, claim, timeout_seconds)
    if lost is not None:
        return CheckRunHealthResult(WorkerStatus.FAILED, f"the run's task {lost}")
    return CheckRunHealthResult(WorkerStatus.RUNNING)


def why_lost(instance: DagsterInstance, claim: claims.Claim, timeout_seconds: float) -> str | None:
    """Why the claimed task is lost ("{task}: its worker {id} was last seen ..."); None while
    its worker holds it. A beat taken before the claim cannot list the task yet; one taken after
    it must."""
    last = last_beat(instance, claim.worker_id)
    stale = why_stale(last, timeout_seconds)
    if stale is not None:
        return f"{claim.task_id}: its worker {claim.worker_id} was {stale}"
    assert last is not None
    if claim.task_id not in last.tasks and last.at >= claim.at:
        return (
            f"{claim.task_id}: its worker {claim.worker_id} lives but no longer holds it (the "
            "task ended without settling its run; see the worker's log)"
        )
    return None


def why_stale(last: Beat | None, timeout_seconds: float) -> str | None:
    """Why a worker whose last beat is ``last`` counts as dead ("last seen ..."); None while
    its heartbeat is fresh."""
    age = time.time() - last.at if last is not None else None
    if age is not None and age <= timeout_seconds:
        return None
    seen = (
        f"{age:.0f}s ago"
        if age is not None
        else "never (it has no heartbeat row: it exited, or died long ago)"
    )
    return f"last seen {seen} (heartbeat_timeout_seconds={timeout_seconds:g})"
