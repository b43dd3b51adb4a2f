"""Issue 27: storage calls per busy worker per second, and how long a reconciliation sensor
tick holds the daemon; today's package beside main before the fleet work (``baseline``).

``python -m benchmarks.poll_noise [seconds]`` prints a small table. Each figure is measured by
``python -m benchmarks.poll_noise measure <seconds> <endpoint>`` run once with today's package
and once with ``BEFORE_FLEET``'s first on the path (``baseline.run_with``); that child calls
only what both versions have, at each version's own defaults.

- storage calls: a real ``Worker`` in-process against a sqlite instance, holding ``HELD`` run
  tasks (a real sleeping child each, STARTED runs), its poll and heartbeat loops running for
  ``seconds``; every connection its storage calls open is counted (``storage_calls``).
- sensor tick: the default ``cancel_reconciliation_sensor`` evaluated as the daemon does,
  against a local moto server: idle (no acks), and with ``ACKS`` acks waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from benchmarks.baseline import BEFORE_FLEET, run_with
from benchmarks.harness import Context
from benchmarks.stats import Row
from benchmarks.storage_calls import counted

HELD = 4  # a busy worker: every slot of the default concurrency taken
ACKS = 30
TICKS = 3


def storage_calls_per_second(seconds: float) -> float:
    from dagster._core.test_utils import instance_for_test

    from dagster_taskiq_cancel.settings import TaskiqCancelSettings
    from dagster_taskiq_cancel.worker.worker import Worker
    from dagster_taskiq_cancel_tests.test_worker_faults import RecordingBroker, hold, started_run

    with tempfile.TemporaryDirectory() as home, instance_for_test(temp_dir=home) as instance:
        settings = TaskiqCancelSettings(queue_name=f"b{uuid.uuid4().hex[:12]}")
        worker = Worker(settings, instance, RecordingBroker(settings, instance))
        worker._beat_instance = instance  # the beats through the counted storage too

        async def scenario() -> float:
            for n in range(HELD):
                await hold(worker, started_run(instance, Path(home) / str(n)))
            await worker.check_held()  # the first look at each STARTED run, done at start
            loop = asyncio.get_running_loop()
            loops = [
                loop.create_task(worker.poll_loop()),
                loop.create_task(worker.heartbeat_loop()),
            ]
            with counted(instance) as calls:
                await asyncio.sleep(1)  # past the loops' first rounds: the steady state
                start = time.monotonic()
                await asyncio.sleep(seconds)
                rate = calls.between(start, start + seconds) / seconds
            for task in loops:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await worker.stop_all()
            return rate

        try:
            return asyncio.run(scenario())
        finally:
            worker.close()


def sensor_ticks(endpoint_url: str) -> dict[str, float]:
    """Median seconds of a default tick: idle, and with ``ACKS`` acks (of unknown runs)."""
    import dagster as dg

    from dagster_taskiq_cancel import TaskiqCancelResource, cancel_reconciliation_sensor
    from dagster_taskiq_cancel.messages import CancelAck, codec_for
    from dagster_taskiq_cancel_tests.stack import Deployment

    with tempfile.TemporaryDirectory() as root:
        deployment = Deployment(Path(root), endpoint_url)
        resource = TaskiqCancelResource(**deployment.settings.model_dump(exclude_none=True))
        queues, codec = deployment.queues, codec_for(deployment.settings)

        def tick() -> float:
            context = dg.build_sensor_context(
                instance=deployment.instance, resources={"taskiq": resource}
            )
            started = time.perf_counter()
            cancel_reconciliation_sensor(context)
            return time.perf_counter() - started

        def with_acks() -> float:
            for _ in range(ACKS):
                ack = CancelAck(run_id=uuid.uuid4().hex, worker_id="bench", outcome="skipped")
                queues.send(queues.names.acks, codec.dumps(ack), "bench", uuid.uuid4().hex)
            return tick()

        tick()  # the first builds the boto3 client
        idle = statistics.median(tick() for _ in range(TICKS))
        busy = statistics.median(with_acks() for _ in range(TICKS))
        deployment.stop()
    return {"idle": idle, "acks": busy}


def measure(seconds: float, endpoint_url: str) -> dict[str, float]:
    figures = sensor_ticks(endpoint_url)
    figures["storage_calls_per_second"] = storage_calls_per_second(seconds)
    return figures


FIGURES = (
    ("storage calls per busy worker per second", "storage_calls_per_second"),
    ("sensor tick holding the daemon, idle [s]", "idle"),
    (f"sensor tick, {ACKS} acks waiting [s]", "acks"),
)


def side_by_side(seconds: float, endpoint_url: str) -> dict[str, dict[str, float]]:
    """Main before the fleet work's figures, then today's, each measured by a child."""
    found = {}
    for label, commit in ((f"main {BEFORE_FLEET}", BEFORE_FLEET), ("today", None)):
        args = ("measure", str(seconds), endpoint_url)
        out = run_with(commit, "benchmarks.poll_noise", *args).stdout
        found[label] = json.loads(out.strip().splitlines()[-1])
    return found


def run(ctx: Context) -> list[Row]:
    """The ``poll`` scenario of ``python -m benchmarks``: a 60 s window per version."""
    before, today = side_by_side(60.0, ctx.endpoint_url).values()
    peer = f"main {BEFORE_FLEET}"
    return [Row("poll", name, [today[key]], peer, [before[key]]) for name, key in FIGURES]


def main(seconds: float) -> None:
    from dagster_taskiq_cancel.local_sqs import LOCAL_CREDENTIALS, MotoServer

    os.environ.update(LOCAL_CREDENTIALS)
    server = MotoServer().start()
    try:
        found = side_by_side(seconds, server.endpoint_url)
    finally:
        server.stop()
    print(f"{'figure':48} " + " ".join(f"{label:>16}" for label in found))
    for name, key in FIGURES:
        print(f"{name:48} " + " ".join(f"{f[key]:>16.2f}" for f in found.values()))


if __name__ == "__main__":
    if sys.argv[1:2] == ["measure"]:
        print(json.dumps(measure(float(sys.argv[2]), sys.argv[3])))
    else:
        main(float(sys.argv[1]) if len(sys.argv) > 1 else 60.0)
