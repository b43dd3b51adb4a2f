"""One worker process's life: start-up checks, the three loops, and a drain on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import subprocess
import sys
from collections.abc import Sequence

from dagster import DagsterInstance
from taskiq import AcknowledgeType
from taskiq.receiver import Receiver

from dagster_taskiq_cancel.settings import TaskiqCancelSettings
from dagster_taskiq_cancel.worker.worker import Worker

logger = logging.getLogger(__name__)


async def serve(settings: TaskiqCancelSettings, instance: DagsterInstance) -> None:
    """Serve until SIGTERM/SIGINT; then stop receiving, drain, and stop what is left."""
    worker = Worker(settings, instance)
    try:
        await worker.broker.startup()
        await _serve(worker)
    finally:
        await worker.broker.shutdown()
        worker.close()


async def _serve(worker: Worker) -> None:
    settings = worker.settings
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    # Delete at start: a held message never times out and runs twice; a worker that dies
    # mid-run is caught by Dagster's run monitoring instead (see README, "Worker crashes").
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
    helpers = [asyncio.create_task(worker.poll_loop()), asyncio.create_task(worker.cancel_loop())]
    logger.info(
        "Worker %s listening on %s (%s slots, poll every %ss)",
        worker.worker_id,
        worker.broker.names.main,
        settings.concurrency,
        settings.poll_interval_seconds,
    )
    print(f"worker {worker.worker_id} ready", flush=True)
    await asyncio.wait(
        [receiving, asyncio.create_task(stopping.wait())], return_when="FIRST_COMPLETED"
    )
    logger.info("Worker %s draining: %d task(s) running", worker.worker_id, len(worker.held))
    finish.set()
    handed_back = await worker.broker.release_unstarted()
    if handed_back:
        logger.info("Handed %d received, unstarted task(s) back to the queue", handed_back)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(receiving), settings.drain_seconds)
    await worker.stop_all()
    for task in (*helpers, receiving):
        task.cancel()
    await asyncio.gather(*helpers, receiving, return_exceptions=True)
    logger.info("Worker %s stopped", worker.worker_id)


def run_processes(argv: Sequence[str], count: int) -> int:
    """Run ``count`` worker processes with ``argv``; forward SIGTERM/SIGINT; wait for all."""
    procs = [
        subprocess.Popen([sys.executable, "-m", "dagster_taskiq_cancel", *argv])
        for _ in range(count)
    ]

    def forward(signum: int, _frame: object) -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    return max(proc.wait() for proc in procs)
