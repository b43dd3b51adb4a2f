"""Many busy workers in one process: ``python -m benchmarks.fleet_sim HOME RUNS SYNC`` prints JSON.

Each simulated worker is the package's real ``Worker`` (whichever version is first on the path,
see ``baseline.run_with``), built as ``cli worker`` builds it (``load_worker_instance``, so its
own instance and connections), holding one STARTED run through its real ``_run_child`` with a
stand-in child process, and running its real loops: the main-queue receiver, the poll, the
heartbeat, the cancel and hint loops. So its storage and SQS calls are the worker's own, at the
worker's rates. Only names 94b9a24 has too are used, so both versions run this same file.

Counting, within the window the parent announces (``SYNC/go``) once every process is ready:
storage calls (each call a worker's storage threads run, and its time on the thread), SQL
statements (SQLAlchemy's cursor events) and SQS requests (a botocore event hook).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import json
import logging
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import botocore.handlers
from sqlalchemy import event
from sqlalchemy.engine import Engine

from dagster_taskiq_cancel import hints
from dagster_taskiq_cancel.cli import load_worker_instance, worker_settings
from dagster_taskiq_cancel.local_sqs import LOCAL_CREDENTIALS
from dagster_taskiq_cancel.queues import SyncQueues
from dagster_taskiq_cancel.worker import worker as worker_module
from dagster_taskiq_cancel.worker.held import HeldTask
from dagster_taskiq_cancel_tests.stack import hold

# Above Linux's largest pid_max (2**22): a signal to the stand-in child can reach no process.
_NO_PID = 2**22 + 1


class Counts:
    """What the simulated workers of this process did; read at the window's start and end."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: collections.Counter[str] = collections.Counter()  # by storage thread kind
        self.statements = 0
        self.sqs: collections.Counter[str] = collections.Counter()  # by SQS operation
        self.poll_ms: list[tuple[float, float]] = []  # (ended at, ms on the thread)
        self.problems: collections.Counter[str] = collections.Counter()

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {
                "calls": dict(self.calls),
                "statements": self.statements,
                "sqs": dict(self.sqs),
                "problems": sum(self.problems.values()),
            }


COUNTS = Counts()


class CountingExecutor(concurrent.futures.ThreadPoolExecutor):
    """The worker's storage threads, counted: every call and, for the poll's, its time."""

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        kind = "beat" if self._thread_name_prefix.startswith("heartbeat") else "poll"

        def timed() -> Any:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                ended = time.perf_counter()
                with COUNTS.lock:
                    COUNTS.calls[kind] += 1
                    if kind == "poll":
                        COUNTS.poll_ms.append((time.time(), (ended - started) * 1000))

        return super().submit(timed)


class ProblemLog(logging.Handler):
    """Counts the worker's warnings and errors: a figure from a failing fleet is no figure."""

    def emit(self, record: logging.LogRecord) -> None:
        with COUNTS.lock:
            COUNTS.problems[record.getMessage()[:120]] += 1


def _count_statement(*_args: Any) -> None:
    with COUNTS.lock:
        COUNTS.statements += 1


def _count_sqs(event_name: str, **_kwargs: Any) -> None:
    with COUNTS.lock:
        COUNTS.sqs[event_name.rsplit(".", 1)[-1]] += 1


def instrument() -> None:
    """Hook the counters in before any worker, engine or SQS client exists."""
    worker_module.ThreadPoolExecutor = CountingExecutor  # type: ignore[attr-defined,misc]
    event.listen(Engine, "before_cursor_execute", _count_statement)
    # Every botocore session made from now on (each worker's aioboto3 client) registers it.
    botocore.handlers.BUILTIN_HANDLERS.append(("before-call.sqs", _count_sqs))
    problems = ProblemLog(logging.WARNING)
    logging.getLogger().addHandler(problems)
    logging.getLogger().setLevel(logging.WARNING)


class StandInChild:
    """The held run's child process: it runs until the simulation ends."""

    def __init__(self) -> None:
        self.pid = _NO_PID
        self.returncode: int | None = None
        self._ended = asyncio.Event()

    async def wait(self) -> int:
        await self._ended.wait()
        return 0


async def start_worker(
    run_id: str, queues: SyncQueues, scratch: Path
) -> tuple[Any, list[asyncio.Task[Any]]]:
    """One busy worker, as ``cli worker`` makes it, with its loops running."""
    from taskiq import AcknowledgeType
    from taskiq.receiver import Receiver

    instance = await asyncio.to_thread(load_worker_instance)
    settings = worker_settings(instance, {})
    worker = worker_module.Worker(settings, instance)
    await worker.broker.startup()
    url = await asyncio.to_thread(hints.create, queues, worker.worker_id)
    worker.broker.add_queue(worker.hint_queue, url)
    await asyncio.to_thread(hold, instance, run_id, worker.worker_id)
    run = await asyncio.to_thread(instance.get_run_by_id, run_id)
    assert run is not None
    held = HeldTask(run_id, run_id, None, StandInChild(), run.tags, scratch / run_id)  # type: ignore[arg-type]
    receiver = Receiver(
        worker.broker,
        max_async_tasks=settings.concurrency,
        max_prefetch=settings.prefetch,
        ack_type=AcknowledgeType.WHEN_RECEIVED,
        run_startup=False,
    )
    loop = asyncio.get_running_loop()
    return worker, [
        loop.create_task(receiver.listen(asyncio.Event())),
        loop.create_task(worker.poll_loop()),
        loop.create_task(worker.heartbeat_loop()),
        loop.create_task(worker.cancel_loop()),
        loop.create_task(worker.hint_loop()),
        loop.create_task(worker._run_child(held)),
    ]


async def wait_for_file(path: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear in {timeout:.0f}s")
        await asyncio.sleep(0.2)
    return path.read_text()


async def simulate(run_ids: list[str], sync: Path, name: str) -> dict[str, Any]:
    instrument()
    scratch = Path(tempfile.mkdtemp(prefix="fleet-sim-"))
    started = time.monotonic()
    admin = load_worker_instance()
    queues = SyncQueues(worker_settings(admin, {}))  # hint queues: set-up only, not counted
    admin.dispose()
    workers = []
    tasks: list[asyncio.Task[Any]] = []
    try:
        for run_id in run_ids:
            worker, loops = await start_worker(run_id, queues, scratch)
            tasks += loops
            workers.append(worker)
        setup_s = time.monotonic() - started
        (sync / f"ready-{name}").write_text("")
        go = json.loads(await wait_for_file(sync / "go", 900))
        start, end = go["start"], go["start"] + go["seconds"]
        await asyncio.sleep(max(0.0, start - time.time()))
        first = COUNTS.snapshot()
        await asyncio.sleep(max(0.0, end - time.time()))
        last = COUNTS.snapshot()
        dead = [repr(t.exception()) for t in tasks if t.done() and not t.cancelled()]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for worker in workers:
            await _stop(worker, queues)
    with COUNTS.lock:
        poll_ms = [ms for at, ms in COUNTS.poll_ms if start <= at <= end]
        problems = COUNTS.problems.most_common(5)
    return {
        "workers": len(run_ids),
        "seconds": go["seconds"],
        "setup_s": setup_s,
        "calls": {k: v - first["calls"].get(k, 0) for k, v in last["calls"].items()},
        "statements": last["statements"] - first["statements"],
        "sqs": {k: v - first["sqs"].get(k, 0) for k, v in last["sqs"].items()},
        "problems": last["problems"] - first["problems"],
        "problem_kinds": problems,
        "dead_loops": dead[:5],
        "poll_ms": poll_ms,
    }


async def _stop(worker: Any, queues: SyncQueues) -> None:
    try:
        await worker.broker.shutdown()
        await asyncio.to_thread(hints.delete, queues, worker.hint_queue)
    finally:
        worker.close()
        worker.instance.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fleet_sim", description=__doc__)
    parser.add_argument("home", type=Path, help="DAGSTER_HOME of the deployment")
    parser.add_argument("runs", type=Path, help="file of STARTED run ids, one per worker")
    parser.add_argument("sync", type=Path, help="folder: ready-NAME written, go read")
    parser.add_argument("--name", default=str(os.getpid()))
    args = parser.parse_args(argv)
    os.environ.update({**LOCAL_CREDENTIALS, "DAGSTER_HOME": str(args.home)})
    run_ids = args.runs.read_text().split()
    result = asyncio.run(simulate(run_ids, args.sync, args.name))
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
