"""Dead workers' leftovers, swept a few at a time: their hint queue, then their heartbeat row.

A worker writes its heartbeat row before it creates its hint queue, and on a clean exit deletes
the queue, then the row; so a worker that died (SIGKILL, OOM, lost host) leaves both, and every
such queue has a row. Listing the queues instead would cost each starting worker calls in
proportion to the fleet (2 M for a rolling restart of 1,000 workers).

Each live worker walks the heartbeat rows in key order from its own key on (keys hold host,
pid and a random part, so workers start at spread points), ``BATCH`` rows a step: one step as
it starts serving, then one every few heartbeat timeouts, jittered. A step costs at most two
reads, one run query and, per dead row, one queue delete and one row delete, whatever the
size of the fleet; and any one live worker visits every row within (rows / ``BATCH``) steps,
so the sweep converges.

A row goes only when its worker is dead by the same judgement as run monitoring's (its beat
is stale) and nothing needs it: none of the runs its last beat listed is still unfinished
(run monitoring, the step health check and the sensor name a lost worker and when it was last
seen). The row delete is a compare-and-delete of the value read, so a worker that beat again
meanwhile keeps its row. A live worker's queue is never deleted: its beat is fresh.
"""

from __future__ import annotations

import asyncio
import logging
import random

from dagster import DagsterInstance, RunsFilter

from dagster_taskiq_cancel import heartbeats, hints
from dagster_taskiq_cancel.queues import SyncQueues
from dagster_taskiq_cancel.tasks import run_id_of

logger = logging.getLogger(__name__)

BATCH = 20
TIMEOUTS_PER_STEP = 5  # one step every five heartbeat timeouts (5 minutes by default), jittered


def step(
    instance: DagsterInstance,
    queues: SyncQueues,
    me: str,
    cursor: str,
    timeout_seconds: float,
    batch: int = BATCH,
) -> tuple[str, list[str]]:
    """Visit up to ``batch`` rows after ``cursor``; remove the dead ones nothing needs.
    Returns the next cursor and the worker ids removed."""
    rows = heartbeats.rows_after(instance, cursor, batch)
    dead = {
        worker_id: raw
        for worker_id, raw in rows
        if worker_id != me and heartbeats.why_stale(_beat(raw), timeout_seconds) is not None
    }
    needed = _still_needed(instance, dead)
    removed = []
    for worker_id, raw in dead.items():
        if worker_id in needed or not hints.delete(queues, _queue_of(queues, worker_id, raw)):
            continue
        if heartbeats.forget(instance, worker_id, only_if=raw):
            logger.info("Removed the hint queue and heartbeat of dead worker %s", worker_id)
            removed.append(worker_id)
    return (rows[-1][0] if rows else me), removed


def _queue_of(queues: SyncQueues, worker_id: str, raw: str) -> str:
    """The hint queue the row names (workers of other queue names share the run storage); a
    row of an earlier version names none: this deployment's name for the worker."""
    beat = _beat(raw)
    return beat.queue if beat and beat.queue else hints.hint_queue_name(queues.names, worker_id)


def _beat(raw: str) -> heartbeats.Beat | None:
    """The row's beat; a row that does not parse counts as a worker never seen."""
    try:
        return heartbeats.parse(raw)
    except (ValueError, KeyError, TypeError):
        return None


def _still_needed(instance: DagsterInstance, dead: dict[str, str]) -> set[str]:
    """The dead workers whose last beat listed a task of a run that has not finished (one
    query for the whole batch)."""
    listed = {
        worker_id: {run_id_of(task) for task in beat.tasks}
        for worker_id, raw in dead.items()
        if (beat := _beat(raw)) is not None and beat.tasks
    }
    run_ids = set().union(*listed.values()) if listed else set()
    if not run_ids:
        return set()
    live = {
        run.run_id
        for run in instance.get_runs(RunsFilter(run_ids=list(run_ids)))
        if not run.is_finished
    }
    return {worker_id for worker_id, runs in listed.items() if runs & live}


async def sweep_loop(
    instance: DagsterInstance, queues: SyncQueues, me: str, timeout_seconds: float
) -> None:
    """A step at once, then every ``TIMEOUTS_PER_STEP`` heartbeat timeouts (jittered, so that
    a fleet started together does not sweep in step); a failed step is only logged: sweeping
    is housekeeping, and the next step goes on."""
    cursor = me
    while True:
        try:
            cursor, _ = await asyncio.to_thread(step, instance, queues, me, cursor, timeout_seconds)
        except Exception as exc:
            logger.warning("Sweeping dead workers' rows failed (next try later): %r", exc)
        await asyncio.sleep(timeout_seconds * TIMEOUTS_PER_STEP * random.uniform(0.5, 1.5))
