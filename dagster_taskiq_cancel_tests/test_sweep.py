"""A worker's start-up costs the same whatever the fleet left behind, and the rows and hint
queues of workers go: at a clean exit at once, a dead worker's once nothing needs it.

In-process: real ``Worker`` objects (their start-up and exit, not copies) against a real SQS
server over HTTP and a real sqlite instance; SQS calls are counted at ``SyncQueues.call`` and
storage calls as the SQL statements the run storage executes.
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as db
import yaml
from dagster import DagsterInstance, DagsterRun, reconstructable
from sqlalchemy.engine import Engine

from dagster_taskiq_cancel import heartbeats, hints
from dagster_taskiq_cancel.local_sqs import LocalSqsServer
from dagster_taskiq_cancel.queues import SqsError, SyncQueues
from dagster_taskiq_cancel.settings import TaskiqCancelSettings
from dagster_taskiq_cancel.tasks import step_task_id
from dagster_taskiq_cancel.worker import process, sweep
from dagster_taskiq_cancel.worker.worker import Worker
from dagster_taskiq_cancel_tests.jobs import sleepy_job
from dagster_taskiq_cancel_tests.stack import MOTO_ONLY, wait_for

TIMEOUT = 0.5  # heartbeat timeout: a beat this old is a dead worker's
LONG_AGO = 3600.0


class CountingQueues(SyncQueues):
    """Counts every SQS call by method; refuses ``delete_queue`` while ``refuse_deletes``."""

    def __init__(self, settings: TaskiqCancelSettings) -> None:
        super().__init__(settings)
        self.calls: collections.Counter[str] = collections.Counter()
        self.refuse_deletes = False

    def call(self, method: str, **kwargs: Any) -> Any:
        self.calls[method] += 1
        if method == "delete_queue" and self.refuse_deletes:
            raise SqsError("AccessDenied: not allowed to delete queues")
        return super().call(method, **kwargs)


class Statements:
    """Counts the SQL statements every engine executes (storage round trips)."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, *_args: Any) -> None:
        self.count += 1


@pytest.fixture
def statements() -> Iterator[Statements]:
    counter = Statements()
    db.event.listen(Engine, "before_cursor_execute", counter)
    try:
        yield counter
    finally:
        db.event.remove(Engine, "before_cursor_execute", counter)


@pytest.fixture
def instance(tmp_path: Path) -> Iterator[DagsterInstance]:
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump({"telemetry": {"enabled": False}}))
    with DagsterInstance.from_config(str(tmp_path)) as dagster_instance:
        yield dagster_instance


@pytest.fixture
def queues(sqs_server: LocalSqsServer) -> CountingQueues:
    settings = TaskiqCancelSettings(
        queue_name=f"s{uuid.uuid4().hex[:10]}",
        endpoint_url=sqs_server.endpoint_url,
        heartbeat_timeout_seconds=TIMEOUT,
    )
    counting = CountingQueues(settings)
    counting.create_all()
    return counting


def boot(instance: DagsterInstance, queues: SyncQueues) -> Worker:
    """A worker's real start-up (``process.start_up``), without its loops."""
    worker = Worker(queues.settings, instance)
    asyncio.run(process.start_up(worker, queues))
    return worker


def exit_cleanly(worker: Worker, queues: SyncQueues) -> None:
    asyncio.run(process.leave(worker, queues))
    worker.close()


def leave_dead(instance: DagsterInstance, queues: SyncQueues, count: int, *tasks: str) -> set[str]:
    """``count`` workers that died long ago: a hint queue each, and a stale heartbeat listing
    ``tasks``."""
    dead = {f"dead-host:{index}:{uuid.uuid4().hex[:8]}" for index in range(count)}
    for worker_id in dead:
        heartbeats.beat(
            instance, worker_id, heartbeats.Beat(time.time() - LONG_AGO, frozenset(tasks))
        )
        hints.create(queues, worker_id)
    return dead


def rows(instance: DagsterInstance) -> set[str]:
    return {worker_id for worker_id, _ in heartbeats.rows_after(instance, "", 100_000)}


def hint_queues(queues: SyncQueues) -> set[str]:
    return {url.rsplit("/", 1)[-1] for url in hints.listed(queues)}


def queue_of(queues: SyncQueues, worker_id: str) -> str:
    return hints.hint_queue_name(queues.names, worker_id)


def sweep_round(instance: DagsterInstance, queues: SyncQueues, live: list[Worker]) -> int:
    """Sweep steps from the first live worker's key until its walk comes round to it again,
    the live workers beating before each (as their heartbeat loops do); returns the steps."""
    me = live[0].worker_id
    cursor, steps = me, 0
    total = len(rows(instance))
    while True:
        for worker in live:
            asyncio.run(worker.register())
        cursor, _ = sweep.step(instance, queues, me, cursor, TIMEOUT)
        steps += 1
        if steps * sweep.BATCH >= total:
            return steps


def make_run(instance: DagsterInstance) -> DagsterRun:
    return instance.create_run_for_job(
        job_def=sleepy_job,
        run_config={"ops": {"sleeper": {"config": {"marker_dir": "/nonexistent"}}}},
        job_code_origin=reconstructable(sleepy_job).get_python_origin(),
    )


def start_up_calls(
    instance: DagsterInstance, queues: CountingQueues, statements: Statements
) -> tuple[int, int, Worker]:
    queues.calls.clear()
    before = statements.count
    worker = boot(instance, queues)
    return sum(queues.calls.values()), statements.count - before, worker


@MOTO_ONLY
def test_start_up_costs_the_same_with_200_dead_workers_queues(
    instance: DagsterInstance, queues: CountingQueues, statements: Statements
) -> None:
    """The start-up makes the same calls with 200 dead workers' queues present as with none;
    the sweep's first step is bounded by its batch, not by the fleet."""
    empty_sqs, empty_storage, first = start_up_calls(instance, queues, statements)
    leave_dead(instance, queues, 200)
    crowded_sqs, crowded_storage, second = start_up_calls(instance, queues, statements)
    assert (crowded_sqs, crowded_storage) == (empty_sqs, empty_storage)
    assert crowded_sqs == 1  # CreateQueue; the URL of the main queues is resolved by the broker

    queues.calls.clear()
    before = statements.count
    _, removed = sweep.step(instance, queues, second.worker_id, second.worker_id, TIMEOUT)
    sweep_storage = statements.count - before
    assert 0 < len(removed) <= sweep.BATCH
    assert queues.calls == {"delete_queue": len(removed)}
    # Two reads at most, one run query, one compare-and-delete per dead row (and connects).
    assert sweep_storage <= 4 * (3 + sweep.BATCH)
    for worker in (first, second):
        exit_cleanly(worker, queues)


@MOTO_ONLY
def test_dead_workers_rows_and_queues_go_once_nothing_needs_them(
    instance: DagsterInstance, queues: CountingQueues
) -> None:
    """Dead rows go within one round of one live worker's walk, with the hint queue each row
    names (one of another queue name too); a dead worker whose beat named an unfinished run
    stays until that run ends; live workers keep their rows and queues."""
    running = make_run(instance)
    finished = make_run(instance)
    instance.report_run_failed(finished)
    dead = leave_dead(instance, queues, 45)
    needed = leave_dead(instance, queues, 2, step_task_id(running.run_id, "sleeper", 0))
    done = leave_dead(instance, queues, 1, f"{finished.run_id}-resume-1")
    other = CountingQueues(
        queues.settings.model_copy(update={"queue_name": f"o{uuid.uuid4().hex[:8]}"})
    )
    other.create_all()
    other_dead = "other-host:1:0a1b2c3d"  # served another queue name, on the same run storage
    other_queue = queue_of(other, other_dead)
    heartbeats.beat(
        instance, other_dead, heartbeats.Beat(time.time() - LONG_AGO, frozenset(), other_queue)
    )
    hints.create(other, other_dead)
    live = [boot(instance, queues) for _ in range(3)]
    live_ids = {worker.worker_id for worker in live}
    total = len(rows(instance))

    steps = sweep_round(instance, queues, live)
    assert steps == math.ceil(total / sweep.BATCH)
    assert rows(instance) == live_ids | needed
    assert hint_queues(queues) == {queue_of(queues, w) for w in live_ids | needed}
    assert not dead & rows(instance) and not done & rows(instance)
    assert other_dead not in rows(instance) and hint_queues(other) == set()

    instance.report_run_failed(running)
    sweep_round(instance, queues, [*live[1:], live[0]])  # another walker
    assert rows(instance) == live_ids
    for worker in live:
        exit_cleanly(worker, queues)
    assert rows(instance) == set()
    assert hint_queues(queues) == set()


@MOTO_ONLY
def test_rows_after_many_boots_are_at_most_the_live_workers(
    instance: DagsterInstance, queues: CountingQueues
) -> None:
    """30 boots: 20 exit cleanly, 10 die; with 2 workers left alive and sweeping, the rows and
    queues left are those of the live workers."""
    live = [boot(instance, queues) for _ in range(2)]
    for index in range(30):
        worker = boot(instance, queues)
        if index % 3:
            exit_cleanly(worker, queues)
        else:
            worker.close()  # killed: leaves its row and its queue
    assert len(rows(instance)) == 12
    live_ids = {worker.worker_id for worker in live}
    wait_for(
        lambda: all(
            heartbeats.why_stale(heartbeats.last_beat(instance, w), TIMEOUT)
            for w in rows(instance) - live_ids
        ),
        10,
        "dead workers' beats stale",
    )
    sweep_round(instance, queues, live)
    assert rows(instance) == live_ids
    assert hint_queues(queues) == {queue_of(queues, w) for w in live_ids}
    for worker in live:
        exit_cleanly(worker, queues)


@MOTO_ONLY
def test_one_fault_leaves_a_row_for_the_sweep_never_a_queue_without_one(
    instance: DagsterInstance, queues: CountingQueues, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refused queue delete keeps the row (it leads the sweep to the queue); a failed row
    delete after the queue went is finished by the next visit."""
    me = boot(instance, queues)
    refused = boot(instance, queues)
    queues.refuse_deletes = True
    exit_cleanly(refused, queues)
    assert refused.worker_id in rows(instance)
    assert queue_of(queues, refused.worker_id) in hint_queues(queues)

    queues.refuse_deletes = False
    row_fails = leave_dead(instance, queues, 1)
    real_forget = heartbeats.forget

    def failing_forget(*_args: Any, **_kwargs: Any) -> bool:
        raise db.exc.OperationalError("DELETE", {}, Exception("disk I/O error"))

    monkeypatch.setattr(heartbeats, "forget", failing_forget)
    wait_for(
        lambda: heartbeats.why_stale(heartbeats.last_beat(instance, refused.worker_id), TIMEOUT),
        10,
        "refused worker's beat stale",
    )
    asyncio.run(me.register())  # it beats; the others do not
    with pytest.raises(db.exc.OperationalError):
        sweep.step(instance, queues, me.worker_id, me.worker_id, TIMEOUT)
    monkeypatch.setattr(heartbeats, "forget", real_forget)
    assert {refused.worker_id} | row_fails <= rows(instance)  # the queue first, the row after
    sweep_round(instance, queues, [me])
    assert rows(instance) == {me.worker_id}
    assert hint_queues(queues) == {queue_of(queues, me.worker_id)}

    exit_cleanly(me, queues)


def test_the_walk_goes_round_every_row_and_a_fresh_beat_survives_the_delete(
    any_storage: DagsterInstance,
) -> None:
    """Key order after a cursor, going round at the end, on sqlite and Postgres; other kv rows
    are never read; the row delete is a compare-and-delete."""
    instance = any_storage
    instance.run_storage.set_cursor_values({"dagster-taskiq/claim/x": "{}", "other": "1"})
    ids = [f"h{index:02d}" for index in range(7)]
    for worker_id in ids:
        heartbeats.beat(instance, worker_id, heartbeats.Beat(time.time() - LONG_AGO, frozenset()))
    assert [w for w, _ in heartbeats.rows_after(instance, "h04", 3)] == ["h05", "h06", "h00"]
    assert [w for w, _ in heartbeats.rows_after(instance, "h01", 10)] == [*ids[2:], "h00", "h01"]
    read = dict(heartbeats.rows_after(instance, "h02", 1))["h03"]
    heartbeats.beat(instance, "h03", heartbeats.Beat(time.time(), frozenset()))  # it beat again
    assert not heartbeats.forget(instance, "h03", only_if=read)
    assert heartbeats.last_beat(instance, "h03") is not None
    assert heartbeats.forget(instance, "h03")
    assert heartbeats.last_beat(instance, "h03") is None
