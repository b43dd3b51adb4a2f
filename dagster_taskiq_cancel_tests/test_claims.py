"""Claims, in process against a real run storage (sqlite, and Postgres where concurrency is the
subject): one winner of concurrent claims, claims no tag can fake or lose, health that means
"holds this task", and admission that never fails work it has not claimed."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from dagster import DagsterInstance, DagsterRun, DagsterRunStatus, reconstructable
from dagster._core.launcher import WorkerStatus
from dagster._grpc.types import ExecuteStepArgs

from dagster_taskiq_cancel import claims, heartbeats
from dagster_taskiq_cancel.settings import TaskiqCancelSettings
from dagster_taskiq_cancel.step_handler import TaskiqStepHandler
from dagster_taskiq_cancel.tasks import (
    CLAIM_TAG,
    RELEASED_TAG,
    TASK_ID_TAG,
    WORKER_ID_TAG,
    resume_task_id,
    step_task_id,
)
from dagster_taskiq_cancel.worker import children
from dagster_taskiq_cancel.worker.admission import Admitted, Gate, NotClaimed
from dagster_taskiq_cancel.worker.worker import Worker
from dagster_taskiq_cancel_tests.jobs import sleepy_job
from dagster_taskiq_cancel_tests.stack import MOTO_ONLY, Deployment

CLAIMERS = 16
TIMEOUT = 30.0  # heartbeat_timeout_seconds of these tests


@pytest.fixture
def instance(any_storage: DagsterInstance) -> DagsterInstance:
    return any_storage


@pytest.fixture
def sqlite_instance(tmp_path: Path) -> Iterator[DagsterInstance]:
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump({"telemetry": {"enabled": False}}))
    with DagsterInstance.from_config(str(tmp_path)) as dagster_instance:
        yield dagster_instance


def make_run(instance: DagsterInstance, tags: dict[str, str] | None = None) -> DagsterRun:
    return instance.create_run_for_job(
        job_def=sleepy_job,
        run_config={"ops": {"sleeper": {"config": {"marker_dir": "/nonexistent"}}}},
        job_code_origin=reconstructable(sleepy_job).get_python_origin(),
        tags=tags or {},
    )


def together(count: int, fn: Callable[[int], Any]) -> list[Any]:
    """``fn(0..count-1)`` on ``count`` threads released at the same moment."""
    barrier = threading.Barrier(count)

    def run(index: int) -> Any:
        barrier.wait()
        return fn(index)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(run, range(count)))


def gate(instance: DagsterInstance, worker_id: str, tmp_path: Path) -> Gate:
    return Gate(instance, worker_id, tmp_path)


def test_a_run_storage_without_a_key_value_table_is_refused_with_what_to_change() -> None:
    with pytest.raises(claims.UnsupportedRunStorage, match="SQL run storage"):
        claims.sql_storage(SimpleNamespace(run_storage=object()))  # type: ignore[arg-type]


def test_of_sixteen_concurrent_claims_of_one_task_exactly_one_wins(
    instance: DagsterInstance,
) -> None:
    run = make_run(instance)
    won = together(CLAIMERS, lambda i: claims.claim(instance, run.run_id, f"worker-{i}"))
    assert won.count(True) == 1, won
    claim = claims.claim_of(instance, run.run_id)
    assert claim is not None and claim.worker_id == f"worker-{won.index(True)}"


def step_health(instance: DagsterInstance, run_id: str, step_key: str) -> tuple[bool, str]:
    """The step handler's health check of attempt 0 of ``step_key``, as its executor asks."""
    settings = TaskiqCancelSettings(heartbeat_timeout_seconds=TIMEOUT, step_claim_timeout_seconds=1)
    handler = TaskiqStepHandler(settings)
    handler._sent[step_task_id(run_id, step_key, 0)] = time.time() - 60  # claim time is over
    args = ExecuteStepArgs(
        job_origin=reconstructable(sleepy_job).get_python_origin(),
        run_id=run_id,
        step_keys_to_execute=[step_key],
    )
    context = SimpleNamespace(execute_step_args=args, instance=instance)
    result = handler.check_step_health(context)  # type: ignore[arg-type]
    return result.is_healthy, result.unhealthy_reason or ""


def test_sixteen_concurrent_step_claims_on_one_run_all_hold(
    instance: DagsterInstance, tmp_path: Path
) -> None:
    """Each claim is a row of its own, and each display tag write may race the others: no
    claim is lost, and every step is healthy while its worker beats and lists it."""
    run = make_run(instance)
    tasks = [step_task_id(run.run_id, f"step_{i}", 0) for i in range(CLAIMERS)]
    won = together(CLAIMERS, lambda i: gate(instance, f"worker-{i}", tmp_path).claim(tasks[i]))
    assert all(won)
    for i, task_id in enumerate(tasks):
        heartbeats.beat(instance, f"worker-{i}", heartbeats.Beat(time.time(), frozenset([task_id])))
    for i in range(CLAIMERS):
        healthy, why = step_health(instance, run.run_id, f"step_{i}")
        assert healthy, why


def test_a_live_worker_that_no_longer_lists_a_task_has_lost_it(
    sqlite_instance: DagsterInstance,
) -> None:
    """Its process died and the worker could not settle the run (a storage error): the worker
    beats on, but the run must not stay STARTED on that account."""
    instance = sqlite_instance
    run = make_run(instance)
    task_id = step_task_id(run.run_id, "sleeper", 0)
    before = heartbeats.Beat(time.time(), frozenset())
    assert claims.claim(instance, task_id, "w")
    heartbeats.beat(instance, "w", before)  # taken before the claim: cannot list it yet
    assert step_health(instance, run.run_id, "sleeper")[0]
    heartbeats.beat(instance, "w", heartbeats.Beat(time.time(), frozenset()))
    healthy, why = step_health(instance, run.run_id, "sleeper")
    assert not healthy and "its worker w lives but no longer holds it" in why, why
    # The run task the same way, through the launcher's health check.
    claims.record_sent(instance, run.run_id, run.run_id)
    assert claims.claim(instance, run.run_id, "w")
    heartbeats.beat(instance, "w", heartbeats.Beat(time.time(), frozenset([run.run_id])))
    assert heartbeats.worker_health(instance, run, TIMEOUT).status == WorkerStatus.RUNNING
    heartbeats.beat(instance, "w", heartbeats.Beat(time.time(), frozenset()))
    result = heartbeats.worker_health(instance, run, TIMEOUT)
    assert result.status == WorkerStatus.FAILED and "no longer holds it" in (result.msg or "")


BOOKKEEPING = {
    CLAIM_TAG: "parent-worker/nonce",
    WORKER_ID_TAG: "parent-worker",
    RELEASED_TAG: "parent-worker",
    "dagster-taskiq/resume_sent_at": "1",
    "dagster-taskiq/notice_seconds": "2",
}


def test_a_run_carrying_a_parents_or_a_users_bookkeeping_tags_is_admitted(
    instance: DagsterInstance, tmp_path: Path
) -> None:
    """Dagster copies a parent's tags to its re-executions and retries; a user may set any
    tag. None of them is this launch's: the run is admitted, claimed, and healthy."""
    parent = make_run(instance)
    child = make_run(instance, {**BOOKKEEPING, TASK_ID_TAG: parent.run_id})
    claims.record_sent(instance, parent.run_id, parent.run_id)
    assert claims.claim(instance, parent.run_id, "parent-worker")
    claims.record_sent(instance, child.run_id, child.run_id)  # as the launcher does
    admitted = gate(instance, "child-worker", tmp_path).admit(
        child.run_id, child.run_id, None, 0, False
    )
    assert isinstance(admitted, Admitted)
    assert admitted.run.tags["dagster-taskiq/notice_seconds"] == "2"  # user-facing: kept
    claim = claims.run_claim(instance, child.run_id)
    assert claim is not None and claim.worker_id == "child-worker"
    run = instance.get_run_by_id(child.run_id)
    assert run is not None
    assert run.tags[WORKER_ID_TAG] == "child-worker" and run.tags[TASK_ID_TAG] == child.run_id
    heartbeats.beat(
        instance, "child-worker", heartbeats.Beat(time.time(), frozenset([child.run_id]))
    )
    assert heartbeats.worker_health(instance, run, TIMEOUT).status == WorkerStatus.RUNNING


def test_a_task_the_launcher_did_not_send_last_is_dropped(
    sqlite_instance: DagsterInstance, tmp_path: Path
) -> None:
    """A run resumed since: its first task (or an old resume) no longer runs, whatever the
    run's ``task_id`` tag says."""
    instance = sqlite_instance
    run = make_run(instance)
    claims.record_sent(instance, run.run_id, resume_task_id(run.run_id, 1))
    instance.add_run_tags(run.run_id, {TASK_ID_TAG: run.run_id})  # a stale or forged tag
    assert gate(instance, "w", tmp_path).admit(run.run_id, run.run_id, None, 0, False) is None
    assert claims.claim_of(instance, run.run_id) is None


ADMISSION_CALLS = [
    ("get_run_by_id", lambda i: i),
    ("get_cursor_values", lambda i: i.run_storage),
    ("connect", lambda i: i.run_storage),
]


@pytest.mark.parametrize(("method", "owner"), ADMISSION_CALLS, ids=[c[0] for c in ADMISSION_CALLS])
def test_a_storage_error_before_the_claim_hands_the_task_back(
    sqlite_instance: DagsterInstance,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    owner: Callable[[DagsterInstance], Any],
) -> None:
    """Admission raises ``NotClaimed`` (the worker sends the task again) and writes nothing;
    the next try admits the run."""
    instance = sqlite_instance
    run = make_run(instance)
    claims.record_sent(instance, run.run_id, run.run_id)
    target = owner(instance)
    real = getattr(target, method)
    failures = iter([True])

    def flaky(*args: Any, **kwargs: Any) -> Any:
        if next(failures, False):
            raise OSError("storage blip")
        return real(*args, **kwargs)

    monkeypatch.setattr(target, method, flaky)
    the_gate = gate(instance, "w", tmp_path)
    with pytest.raises(NotClaimed, match="storage blip"):
        the_gate.admit(run.run_id, run.run_id, None, 0, False)
    monkeypatch.setattr(target, method, real)
    current = instance.get_run_by_id(run.run_id)
    assert current is not None and current.status == DagsterRunStatus.NOT_STARTED
    assert isinstance(the_gate.admit(run.run_id, run.run_id, None, 0, False), Admitted)


def test_a_claim_whose_answer_was_lost_is_still_its_workers(
    sqlite_instance: DagsterInstance, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The INSERT committed, the answer did not arrive: the task comes back to the same
    worker, which finds its own claim; any other worker is refused."""
    instance = sqlite_instance
    run = make_run(instance)
    claims.record_sent(instance, run.run_id, run.run_id)
    real = claims.claim

    def lost_answer(*args: Any) -> bool:
        real(*args)
        raise OSError("connection reset")

    monkeypatch.setattr(claims, "claim", lost_answer)
    assert gate(instance, "w", tmp_path).claim(run.run_id)
    monkeypatch.setattr(claims, "claim", real)
    assert gate(instance, "w", tmp_path).claim(run.run_id)
    assert not gate(instance, "other", tmp_path).claim(run.run_id)


def taken_from_the_queue(deployment: Deployment) -> tuple[str, str]:
    """A launched run whose task message a worker received (and, as on receipt, deleted):
    the run id and the main queue's URL."""
    run_id = deployment.launch(sleepy_job)  # no worker yet: the task waits in the queue
    queues = deployment.queues
    url = queues.url(queues.names.main)
    received = queues.client.receive_message(QueueUrl=url, WaitTimeSeconds=5)["Messages"]
    queues.client.delete_message(QueueUrl=url, ReceiptHandle=received[0]["ReceiptHandle"])
    return run_id, url


@MOTO_ONLY
def test_a_worker_hands_back_a_task_it_could_not_claim(
    deployment: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The task's message was deleted on receipt: a storage error before the claim sends the
    task again (a copy any worker, this one included, may take) and leaves the run alone."""
    run_id, url = taken_from_the_queue(deployment)
    queues = deployment.queues
    instance = deployment.instance
    real = instance.get_run_by_id
    failures = iter([True])

    def flaky(run_id: str) -> DagsterRun | None:
        if next(failures, False):
            raise OSError("storage blip")
        return real(run_id)

    monkeypatch.setattr(instance, "get_run_by_id", flaky)
    worker = Worker(deployment.settings, instance)

    async def admit_once() -> None:
        await worker.broker.startup()
        try:
            await worker.execute(run_id, run_id, None, 0)
        finally:
            await worker.broker.shutdown()

    try:
        asyncio.run(admit_once())
    finally:
        worker.close()
    assert deployment.status(run_id) == DagsterRunStatus.STARTING
    again = queues.client.receive_message(QueueUrl=url, WaitTimeSeconds=5).get("Messages", [])
    assert [json.loads(m["Body"])["task_id"] for m in again] == [run_id]
    assert claims.claim_of(instance, run_id) is None


@MOTO_ONLY
def test_a_claim_slower_than_the_storage_timeout_is_run_not_handed_back(
    deployment: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The storage answers the claim's INSERT after the worker would give up on a call: the
    worker waits for admission to its end and runs the task it claimed. Sent again instead, the
    copy would be refused by every other worker, and the run would wait for its start timeout."""
    run_id, url = taken_from_the_queue(deployment)
    settings = deployment.settings.model_copy(update={"heartbeat_timeout_seconds": 2.0})
    real = claims.claim

    def slow_claim(*args: Any) -> bool:
        time.sleep(settings.heartbeat_timeout_seconds)  # the fault: twice the storage timeout
        return real(*args)

    monkeypatch.setattr(claims, "claim", slow_claim)
    worker = Worker(settings, deployment.instance)

    async def run_the_task() -> None:
        await worker.broker.startup()
        task = asyncio.get_running_loop().create_task(worker.execute(run_id, run_id, None, 0))
        try:
            deadline = time.monotonic() + 30
            while run_id not in worker.held:
                assert not task.done() and time.monotonic() < deadline, "the task never ran"
                await asyncio.sleep(0.05)
            children.kill_group(worker.held[run_id].process.pid)
            await asyncio.wait_for(task, 30)
        finally:
            task.cancel()
            await worker.broker.shutdown()

    try:
        asyncio.run(run_the_task())
    finally:
        worker.close()
    claim = claims.claim_of(deployment.instance, run_id)
    assert claim is not None and claim.worker_id == worker.worker_id
    queues = deployment.queues
    assert not queues.client.receive_message(QueueUrl=url, WaitTimeSeconds=1).get("Messages")


def test_a_run_task_from_another_queue_than_its_run_was_sent_to_is_dropped_unclaimed(
    sqlite_instance: DagsterInstance, tmp_path: Path
) -> None:
    """A `gpu` run's task on the `cpu` queue (forged, or moved by hand) does not run on the
    `cpu` worker; the copy sent to `gpu` still runs there."""
    instance = sqlite_instance
    run = make_run(instance)
    claims.record_sent(instance, run.run_id, run.run_id, "q-gpu")
    cpu = gate(instance, "cpu-worker", tmp_path)
    assert cpu.admit(run.run_id, run.run_id, None, 0, False, "q-cpu") is None
    assert claims.claim_of(instance, run.run_id) is None
    admitted = gate(instance, "gpu-worker", tmp_path).admit(
        run.run_id, run.run_id, None, 0, False, "q-gpu"
    )
    assert isinstance(admitted, Admitted)
