"""One storage or SQS error at each call of a worker's settle, poll, heartbeat and ack send.

The fast tier: a real ``Worker`` object driven in-process against a real sqlite instance, with
a real child process per held task (a sleeping Python under the task guard), and a fault
injected into one call (an instance method that raises N times, a broker whose send raises).
Each test asserts what a user would see: the run's status and events, the ack, the slot freed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import botocore.exceptions
import pytest
import sqlalchemy.exc
from click.testing import CliRunner
from dagster import (
    DagsterEvent,
    DagsterEventType,
    DagsterInstance,
    DagsterRun,
    DagsterRunStatus,
    RunsFilter,
)
from dagster._core.test_utils import instance_for_test

from dagster_taskiq_cancel import claims, cli, heartbeats
from dagster_taskiq_cancel.broker import CancellableSqsBroker
from dagster_taskiq_cancel.messages import CancelAck
from dagster_taskiq_cancel.settings import TaskiqCancelSettings
from dagster_taskiq_cancel.worker import children
from dagster_taskiq_cancel.worker.held import HeldTask
from dagster_taskiq_cancel.worker.worker import Worker
from dagster_taskiq_cancel_tests.jobs import sleepy_job

HEARTBEAT_TIMEOUT = 3.0  # storage calls wait 1.5 s; settles retry at most every 0.5 s
ACK_RETRY_SECONDS = 3.0  # cancel_timeout_seconds: how long a refused ack is retried (the
# first jittered wait is at most 1.5 s, so a second try always fits)


class RecordingBroker(CancellableSqsBroker):
    """Sends nothing: records each ack with its run's status at the time, or refuses it."""

    def __init__(self, settings: TaskiqCancelSettings, instance: DagsterInstance) -> None:
        super().__init__(settings)
        self.instance = instance
        self.refuse = 0  # sends still to refuse (AccessDenied)
        self.acks: list[tuple[CancelAck, DagsterRunStatus | None]] = []

    async def send(self, name: str, body: str, group_id: str, dedup_id: str) -> None:
        if self.refuse:
            self.refuse -= 1
            error = {"Error": {"Code": "AccessDenied", "Message": "not on -cancel-acks"}}
            raise botocore.exceptions.ClientError(error, "SendMessage")  # type: ignore[arg-type]
        ack = CancelAck.model_validate_json(body)
        run = self.instance.get_run_by_id(ack.run_id)
        self.acks.append((ack, run.status if run else None))


@pytest.fixture
def instance(tmp_path: Path) -> Iterator[DagsterInstance]:
    home = tmp_path / "home"
    home.mkdir()
    with instance_for_test(temp_dir=str(home)) as instance:
        yield instance


@pytest.fixture
def worker(instance: DagsterInstance) -> Iterator[Worker]:
    settings = TaskiqCancelSettings(
        queue_name=f"t{uuid.uuid4().hex[:12]}",
        heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT,
        cancel_timeout_seconds=ACK_RETRY_SECONDS,
        grace_seconds=1,
    )
    worker = Worker(settings, instance, RecordingBroker(settings, instance))
    try:
        yield worker
    finally:
        worker.close()


def fail_next(monkeypatch: pytest.MonkeyPatch, target: Any, name: str, times: int) -> list[int]:
    """``target.name`` raises a database error on its next ``times`` calls; the list counts
    the failures so far."""
    real = getattr(target, name)
    failed = [0]

    def flaky(*args: Any, **kwargs: Any) -> Any:
        if failed[0] < times:
            failed[0] += 1
            raise sqlalchemy.exc.OperationalError(name, {}, Exception("connection lost"))
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, flaky)
    return failed


def _beat_age(instance: DagsterInstance, worker_id: str) -> float | None:
    """Seconds since ``worker_id``'s last heartbeat; None if it never beat."""
    last = heartbeats.last_beat(instance, worker_id)
    return time.time() - last.at if last is not None else None


def started_run(instance: DagsterInstance, tmp_path: Path, cancel_first: bool = False) -> str:
    """A STARTED run held by a run task; ``cancel_first``: a cancel RUN_START overwrote."""
    config = {"ops": {"sleeper": {"config": {"marker_dir": str(tmp_path)}}}}
    run = instance.create_run_for_job(sleepy_job, run_config=config)
    kinds = [DagsterEventType.RUN_STARTING]
    kinds += [DagsterEventType.RUN_CANCELING] if cancel_first else []
    for kind in [*kinds, DagsterEventType.RUN_START]:
        instance.report_dagster_event(DagsterEvent(kind.value, job_name=run.job_name), run.run_id)
    claims.record_sent(instance, run.run_id, run.run_id)
    return run.run_id


async def hold(
    worker: Worker, run_id: str, step_key: str | None = None
) -> tuple[HeldTask, asyncio.Task[None]]:
    """A run task of ``run_id`` (or a step task of ``step_key``) held by ``worker``: a sleeping
    child, as after admission."""
    task_id = run_id if step_key is None else f"{run_id}-{step_key}-0"
    assert claims.claim(worker.instance, task_id, worker.worker_id)
    argv = [sys.executable, "-c", "import time; time.sleep(120)"]
    process = await children.spawn(argv, os.environ)
    cancel_file = Path(worker._cancel_dir) / task_id
    held = HeldTask(task_id, run_id, step_key, process, {}, cancel_file)
    task = asyncio.get_running_loop().create_task(worker._run_child(held))
    await until(lambda: task_id in worker.held, 5, "the task held")
    return held, task


async def until(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)
    return result


def read(instance: DagsterInstance, run_id: str) -> DagsterRun:
    """The run, read past the faults injected into ``get_run_by_id``."""
    (run,) = instance.get_runs(RunsFilter(run_ids=[run_id]))
    return run


async def polled_until(
    worker: Worker, condition: Callable[[], Any], timeout: float, what: str
) -> None:
    """Run the worker's poll, as its poll loop does, until ``condition``."""

    async def polled() -> Any:
        await worker.check_held()
        return condition()

    deadline = time.monotonic() + timeout
    while not await polled():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


def status(instance: DagsterInstance, run_id: str) -> DagsterRunStatus:
    return read(instance, run_id).status


def messages(instance: DagsterInstance, run_id: str) -> list[str]:
    return [e.dagster_event.message or "" for e in instance.all_logs(run_id) if e.dagster_event]


def acks(worker: Worker) -> list[tuple[CancelAck, DagsterRunStatus | None]]:
    broker = worker.broker
    assert isinstance(broker, RecordingBroker)
    return broker.acks


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_a_fenced_run_whose_settle_fails_is_released_once_the_storage_answers(
    worker: Worker, instance: DagsterInstance, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker killed its work for lost storage; the storage fails its settle three times.
    The slot is freed at once; the run is recorded and released on a later try, and a cancel
    that lands after the release ends the run CANCELED with a ``killed`` ack."""
    run_id = started_run(instance, tmp_path)

    async def scenario() -> None:
        _held, child = await hold(worker, run_id)
        failed = fail_next(monkeypatch, instance, "get_run_by_id", 3)
        worker._fence("it could not write its heartbeat for 20s (the run storage did not answer)")
        await asyncio.wait_for(child, 10)  # the slot is free while the settle is retried
        assert failed[0] >= 1
        # Its record is still to write: the beat lists it, so run monitoring waits for it.
        assert run_id in worker.holding().tasks
        # Released: run monitoring's to act on. The release row is written on the storage
        # thread before the worker hears the settle's answer, so wait for the worker.
        await until(lambda: run_id not in worker.holding().tasks, 10, "released")
        assert claims.released_by(instance, run_id)
        assert failed[0] == 3
        assert any("could not write its heartbeat" in m for m in messages(instance, run_id))
        assert status(instance, run_id) == DagsterRunStatus.STARTED  # left to run monitoring
        instance.report_run_canceling(read(instance, run_id))
        canceled = lambda: status(instance, run_id) == DagsterRunStatus.CANCELED  # noqa: E731
        await polled_until(worker, canceled, 5, "CANCELED by the poll")
        await until(lambda: acks(worker), 5, "the ack")
        ((ack, seen),) = acks(worker)
        assert (ack.outcome, seen) == ("killed", DagsterRunStatus.CANCELED)

    run(scenario)


def test_a_cancelled_run_whose_settle_fails_ends_canceled_before_its_ack(
    worker: Worker, instance: DagsterInstance, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_id = started_run(instance, tmp_path)

    async def scenario() -> None:
        held, child = await hold(worker, run_id)
        instance.report_run_canceling(read(instance, run_id))
        await worker.check_held()
        assert held.cancel and held.stop_started_at is not None
        failed = fail_next(monkeypatch, instance, "get_run_by_id", 2)
        await asyncio.wait_for(child, 10)
        await until(lambda: acks(worker), 10, "the ack")
        assert failed[0] == 2
        ((ack, seen),) = acks(worker)
        assert seen == DagsterRunStatus.CANCELED, "the ack goes only after the settle"
        assert ack.outcome in ("cancelled", "killed")

    run(scenario)


def test_an_overwritten_cancel_whose_check_fails_once_is_asserted_on_the_next_poll(
    worker: Worker, instance: DagsterInstance, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Terminate landed before Dagster's RUN_START, which overwrote it; the event-log check
    that finds it raises once."""
    run_id = started_run(instance, tmp_path, cancel_first=True)

    async def scenario() -> None:
        held, child = await hold(worker, run_id)
        fail_next(monkeypatch, instance, "get_records_for_run", 1)
        with pytest.raises(sqlalchemy.exc.OperationalError):
            await worker.check_held()
        await worker.check_held()
        assert held.stop_started_at is not None, "the overwritten cancel stops the task"
        await asyncio.wait_for(child, 10)
        assert status(instance, run_id) == DagsterRunStatus.CANCELED

    run(scenario)


@pytest.mark.parametrize("refused", [1, 1_000_000], ids=["refused-once", "refused-always"])
def test_an_ack_that_cannot_be_sent_frees_the_slot(
    worker: Worker, instance: DagsterInstance, tmp_path: Path, refused: int
) -> None:
    """SendMessage on ``-cancel-acks`` is refused (AccessDenied): the task ends at once; the
    ack is retried in the background, for ``cancel_timeout_seconds`` at most."""
    run_id = started_run(instance, tmp_path)
    broker = worker.broker
    assert isinstance(broker, RecordingBroker)

    async def scenario() -> None:
        _held, child = await hold(worker, run_id)
        broker.refuse = refused
        instance.report_run_canceling(read(instance, run_id))
        await worker.check_held()
        await asyncio.wait_for(child, 10)  # the slot is free whether or not the ack went
        assert status(instance, run_id) == DagsterRunStatus.CANCELED
        retrying = worker._acks.retrying
        await until(lambda: not retrying, ACK_RETRY_SECONDS + 5, "the retries to end")
        assert len(acks(worker)) == (1 if refused == 1 else 0)

    run(scenario)


def test_the_heartbeat_is_not_starved_by_a_hung_storage_call(worker: Worker) -> None:
    """A storage call hangs on the worker's storage thread: the beats go on, nothing is fenced."""
    release = threading.Event()

    async def scenario() -> None:
        worker._storage.submit(release.wait, 30)
        beating = asyncio.get_running_loop().create_task(worker.heartbeat_loop())
        try:
            await asyncio.sleep(HEARTBEAT_TIMEOUT)
            age = _beat_age(worker.instance, worker.worker_id)
            assert age is not None and age < HEARTBEAT_TIMEOUT / 2, age
            assert time.monotonic() - worker.last_beat < HEARTBEAT_TIMEOUT / 2
        finally:
            release.set()
            beating.cancel()

    run(scenario)


def test_a_failing_heartbeat_fences_at_two_thirds_of_the_timeout_not_sooner(
    worker: Worker, instance: DagsterInstance, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_id = started_run(instance, tmp_path)

    async def scenario() -> None:
        held, child = await hold(worker, run_id)
        beating = asyncio.get_running_loop().create_task(worker.heartbeat_loop())
        try:
            await until(
                lambda: heartbeats.last_beat(instance, worker.worker_id) is not None,
                5,
                "a beat",
            )
            fail_next(monkeypatch, heartbeats, "beat", 1_000_000)
            await until(lambda: held.fenced_because, HEARTBEAT_TIMEOUT, "the fence")
            silent = time.monotonic() - worker.last_beat
            # Never sooner than two thirds; always before run monitoring takes the worker for dead.
            assert HEARTBEAT_TIMEOUT * 2 / 3 <= silent < HEARTBEAT_TIMEOUT, silent
            await asyncio.wait_for(child, 10)
        finally:
            beating.cancel()

    run(scenario)


# --- start-up ----------------------------------------------------------------------------------


class UniqueViolation(Exception):
    """What psycopg2 raises for a duplicate key (only its pgcode matters here)."""

    pgcode = "23505"


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    """The root logger, restored afterwards: the worker command configures it."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield root
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def test_a_worker_that_loses_the_schema_race_starts_and_keeps_its_logging(
    instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch, root_logger: logging.Logger
) -> None:
    """Components started together against an empty Postgres database race to create Dagster's
    schema: the loser's first load fails on ``instance_info`` after Dagster's own retry logged
    through the root logger. The worker loads again and logs at INFO in its own format."""
    loads = [0]

    def racing_load() -> DagsterInstance:
        loads[0] += 1
        if loads[0] == 1:
            logging.warning("Retrying failed database creation")  # as dagster-postgres does
            orig = UniqueViolation("duplicate key value violates unique constraint")
            raise sqlalchemy.exc.IntegrityError("INSERT INTO instance_info", {}, orig)
        return instance

    async def serving(settings: TaskiqCancelSettings, served: DagsterInstance) -> None:
        assert served is instance
        logging.getLogger("dagster_taskiq_cancel.worker.process").info("Worker listening on q")

    monkeypatch.setattr(DagsterInstance, "get", staticmethod(racing_load))
    monkeypatch.setattr("dagster_taskiq_cancel.worker.process.serve", serving)
    result = CliRunner().invoke(
        cli.main, ["worker", "--queue-name", "q", "--endpoint-url", "http://127.0.0.1:9"]
    )
    assert result.exit_code == 0, result.output
    assert loads[0] == 2
    assert re.search(
        r"INFO dagster_taskiq_cancel\.worker\.process: Worker listening", result.output
    )
    assert "WARNING root: Retrying failed database creation" in result.output
