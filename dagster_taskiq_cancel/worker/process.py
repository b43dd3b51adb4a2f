"""One worker process's life: start-up checks, the six loops, and a drain on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from dagster import DagsterInstance
from taskiq import AcknowledgeType
from taskiq.receiver import Receiver

from dagster_taskiq_cancel import hints, metrics
from dagster_taskiq_cancel.queues import SyncQueues
from dagster_taskiq_cancel.settings import TaskiqCancelSettings
from dagster_taskiq_cancel.storage_pool import close_connections, pool_connections
from dagster_taskiq_cancel.worker import health, keys, sweep
from dagster_taskiq_cancel.worker.worker import Worker

logger = logging.getLogger(__name__)


async def serve(settings: TaskiqCancelSettings, instance: DagsterInstance) -> None:
    """Serve until SIGTERM/SIGINT; then stop receiving, drain, and stop what is left."""
    pool_connections(instance)  # a long-lived process: keep its Postgres connection
    keys.warn_if_written(instance)
    endpoint = health.serve_process(settings)
    worker = Worker(settings, instance)
    queues = SyncQueues(settings)
    try:
        await worker.broker.startup()
        await start_up(worker, queues)
        try:
            await _serve(worker, queues)
        finally:
            await leave(worker, queues)
    finally:
        await worker.broker.shutdown()
        worker.close()
        close_connections(instance)
        if endpoint is not None:
            endpoint.close()


async def start_up(worker: Worker, queues: SyncQueues) -> None:
    """What a worker does before it serves, the same whatever the size of the fleet: its
    heartbeat row, then its hint queue, so that every hint queue has a row for the sweep to find
    it by (``sweep``); dead workers' leftovers are swept later, a few at a time."""
    await worker.register()
    url = await asyncio.to_thread(hints.create, queues, worker.worker_id)
    worker.broker.add_queue(worker.hint_queue, url)


async def leave(worker: Worker, queues: SyncQueues) -> None:
    """A clean exit leaves nothing behind: the hint queue, then the heartbeat row (only once
    the queue is gone: a row left is what leads the sweep to the queue)."""
    if await asyncio.to_thread(hints.delete, queues, worker.hint_queue):
        await worker.forget()


class WorkerLoopFailed(RuntimeError):
    """One of the worker's loops ended: the worker stopped its work and exits non-zero."""


async def _serve(worker: Worker, queues: SyncQueues) -> None:
    """Serve until SIGTERM/SIGINT, or until a loop dies.

    A dead loop would leave the worker half-deaf (no cancels, no polls or no new work), so it
    is logged with its traceback, the held work is stopped at once (no drain: the poll may be
    the loop that died) and ``WorkerLoopFailed`` ends the process with a non-zero exit.
    """
    settings = worker.settings
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    # Delete at start: a held message never times out and runs twice; a worker that dies
    # mid-run is caught by Dagster's run monitoring instead (docs/production.md, "Worker
    # crashes").
    receiver = Receiver(
        worker.broker,
        max_async_tasks=settings.concurrency,
        max_prefetch=settings.prefetch,
        ack_type=AcknowledgeType.WHEN_RECEIVED,
        run_startup=False,
        wait_tasks_timeout=settings.drain_seconds,
    )
    finish = asyncio.Event()
    receiving = asyncio.create_task(receiver.listen(finish))
    loops = {
        receiving: "main-queue receiver",
        asyncio.create_task(worker.poll_loop()): "run storage poll",
        asyncio.create_task(worker.heartbeat_loop()): "heartbeat loop",
        asyncio.create_task(worker.cancel_loop()): "cancel loop",
        asyncio.create_task(worker.hint_loop()): "hint loop",
        asyncio.create_task(
            sweep.sweep_loop(
                worker.instance, queues, worker.worker_id, settings.heartbeat_timeout_seconds
            )
        ): "dead-worker sweep",
    }
    metrics.watch_loops(loops)
    logger.info(
        "Worker %s listening on %s (%s slots, poll every %ss)",
        worker.worker_id,
        ", ".join(worker.broker.task_queues),
        settings.concurrency,
        settings.poll_interval_seconds,
    )
    print(f"worker {worker.worker_id} ready", flush=True)
    signalled = asyncio.create_task(stopping.wait())
    await asyncio.wait([*loops, signalled], return_when="FIRST_COMPLETED")
    failure = _failure(worker, loops)
    if failure is None:
        logger.info("Worker %s draining: %d task(s) running", worker.worker_id, len(worker.held))
    finish.set()
    handed_back = await worker.broker.release_unstarted()
    if handed_back:
        logger.info("Handed %d received, unstarted task(s) back to the queue", handed_back)
    # The main-queue poll in flight answers within its wait time; a worker that hands runs over
    # for a resume waits for it (``stop_all``), so that the resume is not sent to that poll.
    late = asyncio.create_task(worker.broker.release_late())
    if failure is None:
        await asyncio.wait([receiving], timeout=settings.drain_seconds)
        await worker.stop_all(queue_closed=late)
    else:
        await worker.stop_all(failure, late)
        # The stopped tasks end (ack, cleanup) before the loop is torn down.
        await asyncio.wait([receiving], timeout=settings.drain_seconds)
    await _cancel_until_done({*loops, signalled, late})
    if failure is not None:
        raise WorkerLoopFailed(f"worker {worker.worker_id}: {failure}")
    logger.info("Worker %s stopped", worker.worker_id)


async def _cancel_until_done(tasks: set[asyncio.Task[Any]]) -> None:
    """Cancel the tasks, again every second until each has ended: a cancel that lands while a
    library call in a loop completes can be swallowed (Python 3.11's ``wait_for``), and that
    loop would then go on for ever, holding the worker's exit."""
    pending = tasks
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=1)
    for task in tasks:
        if not task.cancelled():
            task.exception()  # retrieved: a loop's own error was reported by ``_failure``


def _failure(worker: Worker, loops: Mapping[asyncio.Task[None], str]) -> str | None:
    """What ended early, logged with its traceback; None when every loop still runs."""
    failed = next((task for task in loops if task.done()), None)
    if failed is None:
        return None
    error = None if failed.cancelled() else failed.exception()
    logger.critical(
        "Worker %s: its %s ended (%r); stopping %d task(s) and exiting",
        worker.worker_id,
        loops[failed],
        error,
        len(worker.held),
        exc_info=error,
    )
    return f"its {loops[failed]} failed"


def run_processes(argv: Sequence[str], count: int, settings: TaskiqCancelSettings) -> int:
    """Run ``count`` worker processes with ``argv``; forward SIGTERM/SIGINT; wait for all.

    A child that exits while nobody asked it to (crash, OOM kill) is not left unnoticed: the
    others are stopped as by SIGTERM (drained) and the parent exits non-zero at once, for its
    supervisor to restart the whole set. With ``settings.metrics_port`` the parent serves the
    children's metrics and health on it (``health.ChildrenEndpoint``).
    """
    endpoint = health.ChildrenEndpoint(settings)
    env = {**os.environ, **endpoint.env}
    procs = {
        proc.pid: proc
        for proc in (
            subprocess.Popen([sys.executable, "-m", "dagster_taskiq_cancel", *argv], env=env)
            for _ in range(count)
        )
    }
    endpoint.live.update(procs)
    try:
        return _wait_for_processes(procs, endpoint)
    finally:
        endpoint.close()


def _wait_for_processes(
    procs: Mapping[int, subprocess.Popen[bytes]], endpoint: health.ChildrenEndpoint
) -> int:
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    worst = 0
    while any(proc.returncode is None for proc in procs.values()):
        pid, status = os.waitpid(-1, 0)
        proc = procs.get(pid)
        if proc is None:
            continue
        proc.returncode = os.waitstatus_to_exitcode(status)
        endpoint.process_dead(pid)
        if not stopping:
            logger.error(
                "Worker process %s exited unexpectedly (code %s); stopping the others",
                pid,
                proc.returncode,
            )
            worst = max(worst, 1)
            forward(signal.SIGTERM, None)
        worst = max(worst, proc.returncode if proc.returncode > 0 else int(proc.returncode != 0))
    return worst
