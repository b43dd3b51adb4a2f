"""A worker with one trivial task, on our broker or on a plain taskiq-aio-sqs broker.

The subject of the dispatch (kick → task start) and idle-cost scenarios. Our side is built the
way ``dagster_taskiq_cancel.worker.process`` builds it (same broker, same Receiver settings,
ack when received), minus the Dagster child: the task only writes the time it started.
Run as ``python -m benchmarks.trivial_worker ours|plain QUEUE ENDPOINT STARTS_FILE``.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from taskiq import AcknowledgeType, AsyncBroker
from taskiq.api import run_receiver_task
from taskiq.receiver import Receiver
from taskiq_aio_sqs import SQSBroker

from benchmarks.harness import REPO
from dagster_taskiq_cancel.broker import CancellableSqsBroker
from dagster_taskiq_cancel.local_sqs import LOCAL_CREDENTIALS
from dagster_taskiq_cancel.settings import TaskiqCancelSettings
from dagster_taskiq_cancel.tasks import EXECUTE_RUN
from dagster_taskiq_cancel_tests.stack import wait_for

STARTS_ENV = "BENCH_STARTS_FILE"


async def record_start(run_id: str) -> None:
    """The trivial task: append the monotonic clock (shared by all processes on Linux).

    It takes ``run_id`` because our broker sets aside any message whose arguments are not
    those of ``execute_run``.
    """
    now = time.monotonic()
    with open(os.environ[STARTS_ENV], "a") as starts:
        starts.write(f"{now}\n")


def build(kind: str, queue: str, endpoint: str) -> tuple[AsyncBroker, Any]:
    """The broker and its registered trivial task, for the worker and the kicker alike."""
    broker: AsyncBroker
    if kind == "ours":
        broker = CancellableSqsBroker(TaskiqCancelSettings(queue_name=queue, endpoint_url=endpoint))
        name = EXECUTE_RUN  # our broker sets aside messages of any other task name
    else:
        # Defaults, as shipped; the peer needs credentials even for a local server.
        broker = SQSBroker(
            queue,
            endpoint_url=endpoint,
            aws_access_key_id=LOCAL_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=LOCAL_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        )
        name = "trivial"
    return broker, broker.register_task(record_start, task_name=name)


async def serve(kind: str, queue: str, endpoint: str) -> None:
    broker, _ = build(kind, queue, endpoint)
    await broker.startup()
    print("ready", flush=True)
    if isinstance(broker, CancellableSqsBroker):
        settings = broker.settings
        receiver = Receiver(
            broker,
            max_async_tasks=settings.concurrency,
            max_prefetch=settings.prefetch,
            ack_type=AcknowledgeType.WHEN_RECEIVED,
            run_startup=False,
        )
        await receiver.listen(asyncio.Event())
    else:
        await run_receiver_task(broker)


def spawn(
    kind: str, queue: str, endpoint: str, folder: Path
) -> tuple[subprocess.Popen[bytes], Path]:
    """Start one such worker and wait until it listens; returns it and its starts file."""
    starts = folder / f"{kind}-starts.txt"
    log = folder / f"{kind}-worker.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.trivial_worker", kind, queue, endpoint],
        env={**os.environ, **LOCAL_CREDENTIALS, STARTS_ENV: str(starts)},
        cwd=REPO,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: proc.poll() is not None or b"ready" in log.read_bytes(), 60, str(log))
        if proc.poll() is not None:
            raise RuntimeError(f"{kind} worker exited: {log.read_text()}")
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, starts


if __name__ == "__main__":
    asyncio.run(serve(*sys.argv[1:4]))
