"""Scenario 4: kick → task start for a trivial task on an idle worker, standard queue,
ours (CancellableSqsBroker, ack when received) vs a plain taskiq-aio-sqs worker as shipped."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

from benchmarks import trivial_worker
from benchmarks.harness import Context
from benchmarks.stats import Row
from dagster_taskiq_cancel.queues import SyncQueues
from dagster_taskiq_cancel.settings import TaskiqCancelSettings
from dagster_taskiq_cancel_tests.stack import stop_process

WARMUP = 3


def create_queues(endpoint: str, prefix: str) -> str:
    """A fresh standard queue (with our cancels/acks siblings, which our broker resolves)."""
    queue = f"{prefix}{uuid.uuid4().hex[:10]}"
    SyncQueues(TaskiqCancelSettings(queue_name=queue, endpoint_url=endpoint)).create_all()
    return queue


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


async def kick_and_time(
    kind: str, queue: str, endpoint: str, starts: Path, count: int
) -> list[float]:
    """Kick sequentially; each sample is the worker's recorded start minus our kick time, in ms."""
    broker, task = trivial_worker.build(kind, queue, endpoint)
    await broker.startup()
    samples: list[float] = []
    try:
        for index in range(WARMUP + count):
            seen = len(_lines(starts))
            kicked = time.monotonic()
            await task.kiq(run_id=f"bench-{index}")
            deadline = kicked + 30
            while len(lines := _lines(starts)) <= seen:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{kind}: task {index} did not start in 30 s")
                await asyncio.sleep(0.001)
            if index >= WARMUP:
                samples.append((float(lines[seen]) - kicked) * 1000)
    finally:
        await broker.shutdown()
    return samples


def measure(ctx: Context, kind: str) -> list[float]:
    queue = create_queues(ctx.endpoint_url, kind)
    proc, starts = trivial_worker.spawn(kind, queue, ctx.endpoint_url, ctx.scratch("dispatch"))
    try:
        return asyncio.run(kick_and_time(kind, queue, ctx.endpoint_url, starts, ctx.size.kicks))
    finally:
        stop_process(proc)


def run(ctx: Context) -> list[Row]:
    plain = measure(ctx, "plain")
    ours = measure(ctx, "ours")
    return [
        Row(
            "4 dispatch, idle worker",
            "kick → task start [ms]",
            ours,
            "taskiq-aio-sqs",
            plain,
            note=f"sequential kicks after {WARMUP} warm-up kicks each; ours acks (deletes) "
            "before it starts the task, as the real worker does",
        )
    ]
