"""What a busy worker costs the run storage, and what it sends nobody needs (issue 27).

The fast tier: a real ``Worker`` in-process against a real sqlite instance, with a real child
process per held task; round trips are counted where the storage is reached
(``storage_calls``). The hint queues are the fast path of a cancel, the timed poll only the
backstop: one round trip per poll for every held task, every ``poll_interval_seconds`` unless
woken.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from dagster import DagsterInstance
from dagster._core.test_utils import instance_for_test

from benchmarks.storage_calls import counted
from dagster_taskiq_cancel import claims
from dagster_taskiq_cancel.backoff import Backoff
from dagster_taskiq_cancel.broker import CancellableSqsBroker
from dagster_taskiq_cancel.messages import CancelRequest, codec_for
from dagster_taskiq_cancel.settings import TaskiqCancelSettings
from dagster_taskiq_cancel.worker.held import HeldTask
from dagster_taskiq_cancel.worker.worker import Worker
from dagster_taskiq_cancel_tests.test_worker_faults import hold, started_run, until

POLL = 0.5  # seconds: a tenth of the default, so that a window of polls takes little time


class SilentBroker(CancellableSqsBroker):
    """Sends nothing over SQS: records what the worker sends, and where."""

    def __init__(self, settings: TaskiqCancelSettings) -> None:
        super().__init__(settings)
        self.sent: list[tuple[str, str]] = []

    async def send(self, name: str, body: str, group_id: str, dedup_id: str) -> None:
        self.sent.append((name, body))


@pytest.fixture(scope="module")
def instance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DagsterInstance]:
    """One for the module (a sqlite instance takes seconds to make); each test its own runs."""
    with instance_for_test(temp_dir=str(tmp_path_factory.mktemp("home"))) as instance:
        yield instance


@pytest.fixture
def worker(instance: DagsterInstance) -> Iterator[Worker]:
    settings = TaskiqCancelSettings(
        queue_name=f"t{uuid.uuid4().hex[:12]}", poll_interval_seconds=POLL, grace_seconds=1
    )
    worker = Worker(settings, instance, SilentBroker(settings))
    try:
        yield worker
    finally:
        worker.close()


async def held_runs(worker: Worker, tmp_path: Path, count: int) -> list[HeldTask]:
    """``count`` STARTED runs, each held by a run task, seen STARTED once (as after the first
    poll): from here on a poll only reads."""
    held = []
    for n in range(count):
        run_id = started_run(worker.instance, tmp_path / str(n))
        held.append((await hold(worker, run_id))[0])
    await worker.check_held()
    assert all(h.start_checked and h.stop_started_at is None for h in held)
    return held


def test_a_poll_is_one_round_trip_whatever_it_holds(worker: Worker, tmp_path: Path) -> None:
    """Statuses and ``sent/`` rows of every held run in one query: 1 round trip for 1 or 4."""

    async def scenario() -> list[int]:
        trips = []
        for count in (1, 3):
            await held_runs(worker, tmp_path / f"h{count}", count)
            with counted(worker.instance) as calls:
                await worker.check_held()
            trips.append(calls.between(0, float("inf")))
        await worker.stop_all()
        return trips

    assert asyncio.run(scenario()) == [1, 1]


def test_the_poll_reads_cancel_end_and_resume_in_its_one_query(
    worker: Worker, tmp_path: Path
) -> None:
    """What the backstop poll acts on still comes through the one query: a cancel stops its
    task, an ended run starts its grace, and a run sent again elsewhere (a resume) fences its
    holder."""
    instance = worker.instance

    async def scenario() -> None:
        cancelled, ended, resumed = await held_runs(worker, tmp_path, 3)
        run = instance.get_run_by_id(cancelled.run_id)
        assert run is not None
        instance.report_run_canceling(run)
        ended_run = instance.get_run_by_id(ended.run_id)
        assert ended_run is not None
        instance.report_run_failed(ended_run)
        claims.record_sent(instance, resumed.run_id, f"{resumed.run_id}-resume-1")
        await worker.check_held()
        assert cancelled.cancel and cancelled.stop_started_at is not None
        assert ended.ended_since is not None and not ended.cancel
        assert resumed.fenced_because is not None and "resume" in resumed.fenced_because
        await worker.stop_all()

    asyncio.run(scenario())


def test_the_poll_waits_its_interval_unless_woken(worker: Worker, tmp_path: Path) -> None:
    """A busy worker reads the storage once per ``poll_interval_seconds`` (the backstop); a
    hint wakes the poll at once, so a cancel does not wait for the interval."""

    async def scenario() -> tuple[int, float]:
        await held_runs(worker, tmp_path, 2)
        with counted(worker.instance) as calls:
            polling = asyncio.get_running_loop().create_task(worker.poll_loop())
            await asyncio.sleep(POLL / 2)  # mid-interval: the loop's first poll is done
            start = time.monotonic()
            window = 4 * POLL
            await asyncio.sleep(window)
            timed = calls.between(start, start + window)
            await asyncio.sleep(POLL / 4)  # mid-interval again: the next poll is far
            woken_at = time.monotonic()
            worker._wake.set()
            await until(lambda: calls.between(woken_at, float("inf")), POLL, "the woken poll")
            latency = calls.at[-1] - woken_at
            polling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await polling
        await worker.stop_all()
        return timed, latency

    timed, latency = asyncio.run(scenario())
    print(f"{timed} round trips in 4 poll intervals; woken poll after {latency * 1000:.0f} ms")
    assert 3 <= timed <= 5
    assert latency < POLL / 2


def test_a_worker_not_holding_the_run_stays_silent(worker: Worker) -> None:
    """With competing consumers most receivers of a cancel do not hold its run: no ack from
    them (a fleet of 1,000 would send 999 per cancel), and the poll is not woken."""
    request = CancelRequest(run_id="not-held-here", reason="test")
    message = {"MessageId": "m1", "Body": codec_for(worker.settings).dumps(request)}

    async def scenario() -> None:
        await worker._handle_cancel(message, worker.broker.names.cancels)

    asyncio.run(scenario())
    assert isinstance(worker.broker, SilentBroker)
    assert worker.broker.sent == []
    assert not worker._wake.is_set()


def test_backoff_is_jittered_within_its_bounds() -> None:
    """Retries of a fleet after one outage spread out instead of coming in lockstep; no wait
    is ever below the start (no spinning) or above the cap."""
    fleet = [Backoff(0.5, 10.0, random.Random(seed)) for seed in range(100)]
    rounds = [[b.next() for b in fleet] for _ in range(8)]
    assert all(0.5 <= w <= 10.0 for waits in rounds for w in waits)
    for waits in rounds[:2]:
        assert len({round(w, 3) for w in waits}) > 90  # spread, not one value
    for waits in rounds:
        assert max(waits.count(w) for w in waits) < len(waits) / 2  # at most some at the cap
    assert max(rounds[-1]) > 5  # and it still grows towards the cap
    with pytest.raises(ValueError, match="start <= cap"):
        Backoff(2.0, 1.0)
