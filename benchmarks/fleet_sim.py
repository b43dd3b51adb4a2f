"""Many busy workers in one process: ``python -m benchmarks.fleet_sim HOME RUNS SYNC`` prints JSON.

Each simulated worker is the package's real ``Worker`` (whichever version is first on the path,
see ``baseline.run_with``), built as ``cli worker`` and ``process.serve`` build it (its own
instance, so its own connections, pooled where the version pools them; its hint queue), holding
one STARTED run through its real ``_run_child`` with a stand-in child process, and running its
real loops: the main-queue receiver, the poll, the heartbeat, the cancel and hint loops. So its
storage and SQS calls are the worker's own, at the worker's rates. Only names 94b9a24 has too
are used, so both versions run this same file.

The parent orders the stages through files in SYNC: every process sets its workers up, then all
start their loops together (``loops``), then the window (``go``) opens once every worker has
beaten. Counted over the window: storage calls (each call a worker's storage threads run, and
its time on the thread), SQL statements (SQLAlchemy's cursor events) and SQS requests (a
botocore event hook).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import contextlib
import faulthandler
import json
import logging
import os
import random
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass
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
# Workers set up at once: their storage and SQS round trips overlap (a fleet boots in parallel).
_STARTING_AT_ONCE = 8
_STOP_WAIT_S = 15.0  # for the workers to close, once the window is over
_FIRST_BEATS_S = 600.0
_ORDER_WAIT_S = 900.0
ABORT = "abort"  # written by the parent instead of an order: another sim process failed


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


@dataclass
class Busy:
    """One simulated worker, set up, its loops not yet started."""

    worker: Any  # worker.Worker, of whichever version is on the path
    held: HeldTask
    receiver: Any  # taskiq's Receiver, as the worker process makes it

    def loops(self, delay: float) -> list[asyncio.Task[Any]]:
        """Its loops, started ``delay`` seconds from now: a fleet's beats are not in step."""

        async def later(loop: Coroutine[Any, Any, Any]) -> Any:
            await asyncio.sleep(delay)
            return await loop

        return [
            asyncio.get_running_loop().create_task(later(loop))
            for loop in (
                self.receiver.listen(asyncio.Event()),
                self.worker.poll_loop(),
                self.worker.heartbeat_loop(),
                self.worker.cancel_loop(),
                self.worker.hint_loop(),
                self.worker._run_child(self.held),
            )
        ]


def serving_instance() -> Any:
    """The instance as ``cli worker`` loads it and ``process.serve`` prepares it: pooled
    connections where the version has them (issue 27), Dagster's own engines in 94b9a24."""
    instance = load_worker_instance()
    try:
        from dagster_taskiq_cancel.storage_pool import pool_connections  # type: ignore
    except ImportError:  # 94b9a24: no pool
        return instance
    return pool_connections(instance)


async def set_up(run_id: str, queues: SyncQueues, scratch: Path) -> Busy:
    """One busy worker as ``cli worker`` makes it: its instance, broker, hint queue, claim."""
    from taskiq import AcknowledgeType
    from taskiq.receiver import Receiver

    instance = await asyncio.to_thread(serving_instance)
    settings = worker_settings(instance, {})
    worker = worker_module.Worker(settings, instance)
    await worker.broker.startup()
    url = await asyncio.to_thread(hints.create, queues, worker.worker_id)
    worker.broker.add_queue(worker.hint_queue, url)
    await asyncio.to_thread(hold, instance, run_id, worker.worker_id)
    run = await asyncio.to_thread(instance.get_run_by_id, run_id)
    assert run is not None
    child: Any = StandInChild()
    held = HeldTask(run_id, run_id, None, child, run.tags, scratch / run_id)
    receiver = Receiver(
        worker.broker,
        max_async_tasks=settings.concurrency,
        max_prefetch=settings.prefetch,
        ack_type=AcknowledgeType.WHEN_RECEIVED,
        run_startup=False,
    )
    return Busy(worker, held, receiver)


async def order(path: Path) -> str:
    """What the parent wrote to ``path`` once every sim process got this far."""
    deadline = time.monotonic() + _ORDER_WAIT_S
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear in {_ORDER_WAIT_S:.0f}s")
        await asyncio.sleep(0.2)
    text = path.read_text()
    if text == ABORT:
        raise RuntimeError("another fleet sim process failed: no window")
    return text


async def simulate(run_ids: list[str], sync: Path, name: str) -> dict[str, Any]:
    instrument()
    scratch = Path(tempfile.mkdtemp(prefix="fleet-sim-"))
    started = time.monotonic()
    admin = load_worker_instance()
    queues = SyncQueues(worker_settings(admin, {}))  # hint queues: set-up only, not counted
    admin.dispose()
    fleet: list[Busy] = []
    tasks: list[asyncio.Task[Any]] = []
    try:
        starting = asyncio.Semaphore(_STARTING_AT_ONCE)

        async def one(run_id: str) -> None:
            async with starting:
                fleet.append(await set_up(run_id, queues, scratch))

        await asyncio.gather(*(one(run_id) for run_id in run_ids))
        setup_s = time.monotonic() - started
        (sync / f"set-up-{name}").write_text("")
        loops_at = float(await order(sync / "loops"))
        await asyncio.sleep(max(0.0, loops_at - time.time()))
        since = time.monotonic()
        for busy in fleet:
            spread = busy.worker.settings.heartbeat_timeout_seconds / 6  # one beat interval
            tasks += busy.loops(random.uniform(0, spread))
        # Ready once each worker beat (its first beat makes its heartbeat instance): the window
        # measures a fleet at work, not one still starting.
        while any(busy.worker.last_beat <= since for busy in fleet):
            if time.monotonic() - since > _FIRST_BEATS_S:
                raise TimeoutError(f"not every worker beat within {_FIRST_BEATS_S:.0f}s")
            await asyncio.sleep(0.5)
        (sync / f"ready-{name}").write_text("")
        go = json.loads(await order(sync / "go"))
        start, end = go["start"], go["start"] + go["seconds"]
        await asyncio.sleep(max(0.0, start - time.time()))
        first = COUNTS.snapshot()
        await asyncio.sleep(max(0.0, end - time.time()))
        last = COUNTS.snapshot()
        with COUNTS.lock:
            problems = COUNTS.problems.most_common(5)
        dead = [repr(t.exception()) for t in tasks if t.done() and not t.cancelled()]
    finally:
        for task in tasks:
            task.cancel()
        stopping = asyncio.gather(
            *tasks, *(_stop(busy.worker) for busy in fleet), return_exceptions=True
        )
        # The figures are taken: a worker slow to let go (a long poll or a storage call still
        # out) must not hold them back. The process exits hard after printing them (``main``).
        with contextlib.suppress(Exception, asyncio.TimeoutError):
            await asyncio.wait_for(stopping, _STOP_WAIT_S)
    with COUNTS.lock:
        poll_ms = [ms for at, ms in COUNTS.poll_ms if start <= at <= end]
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


async def _stop(worker: Any) -> None:
    """Close its client, threads and connections. Its hint queue is left: the deployment's own,
    so no other one lists it, and moto answers a queue's deletion only after the long polls
    still waiting on it (a worker's own exit would delete it, one at a time)."""
    try:
        await worker.broker.shutdown()
    finally:
        worker.close()
        worker.instance.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fleet_sim", description=__doc__)
    parser.add_argument("home", type=Path, help="DAGSTER_HOME of the deployment")
    parser.add_argument("runs", type=Path, help="file of STARTED run ids, one per worker")
    parser.add_argument(
        "sync", type=Path, help="folder: set-up-NAME, ready-NAME written; loops, go read"
    )
    parser.add_argument("--name", default=str(os.getpid()))
    args = parser.parse_args(argv)
    faulthandler.register(signal.SIGUSR1)  # where a stuck sim is: kill -USR1, see its stderr
    os.environ.update({**LOCAL_CREDENTIALS, "DAGSTER_HOME": str(args.home)})
    run_ids = args.runs.read_text().split()
    # Not ``asyncio.run`` and not a normal exit: both wait for every task and thread to end,
    # and one worker still in a long poll or a storage call would keep the process (and the
    # benchmark) waiting. The servers close what is left open when the process is gone.
    result = asyncio.new_event_loop().run_until_complete(simulate(run_ids, args.sync, args.name))
    json.dump(result, sys.stdout)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
