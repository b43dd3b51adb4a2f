"""A stopped run or step frees its Dagster concurrency pool slot, even past a storage fault.

The fast tier: a real ``Worker`` in-process against a real sqlite instance, a sleeping child per
held task, and one fault at the storage call that frees the slot: the worker's settle is
retried until the storage answers, so the slot is freed all the same.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from dagster import DagsterEvent, DagsterEventType, DagsterInstance, DagsterRunStatus

from dagster_taskiq_cancel import claims
from dagster_taskiq_cancel.worker.admission import Gate, NotClaimed
from dagster_taskiq_cancel.worker.worker import Worker
from dagster_taskiq_cancel_tests import test_worker_faults as faults
from dagster_taskiq_cancel_tests.pool_jobs import pooled_job
from dagster_taskiq_cancel_tests.test_worker_faults import (
    fail_next,
    hold,
    read,
    run,
    started_run,
    status,
    until,
)

# The fault tier's fixtures: a real sqlite instance and a Worker on it that sends nothing.
instance = faults.instance
worker = faults.worker

POOL = "db"
FREE_RUN = "free_concurrency_slots_for_run"


def claimed(instance: DagsterInstance) -> list[tuple[str, str]]:
    """(run id, step key) of every claimed slot of the pool."""
    info = instance.event_log_storage.get_concurrency_info(POOL)
    return [(slot.run_id, slot.step_key) for slot in info.claimed_slots]


def holding_a_slot(instance: DagsterInstance, run_id: str, step_key: str) -> None:
    """The pool has one slot, and ``step_key`` of ``run_id`` holds it (as its executor claims)."""
    storage = instance.event_log_storage
    assert storage.supports_global_concurrency_limits
    storage.set_concurrency_slots(POOL, 1)
    assert storage.claim_concurrency_slot(POOL, run_id, step_key).is_claimed
    assert claimed(instance) == [(run_id, step_key)]


@pytest.mark.parametrize(
    ("cancelled", "ends"),
    [(True, DagsterRunStatus.CANCELED), (False, DagsterRunStatus.FAILURE)],
    ids=["cancelled", "process-died"],
)
def test_a_run_whose_processes_are_gone_frees_its_slots_though_the_first_free_fails(
    worker: Worker,
    instance: DagsterInstance,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    cancelled: bool,
    ends: DagsterRunStatus,
) -> None:
    """A run of a run-level executor, stopped by its cancel or dead by itself (an OOM kill, the
    worker fails it): its steps' slots go with its processes."""
    run_id = started_run(instance, tmp_path)
    holding_a_slot(instance, run_id, "sleeper")

    async def scenario() -> None:
        held, child = await hold(worker, run_id)
        failed = fail_next(monkeypatch, instance.event_log_storage, FREE_RUN, 1)
        if cancelled:
            instance.report_run_canceling(read(instance, run_id))
            await worker.check_held()
        else:
            held.process.kill()
        await asyncio.wait_for(child, 10)
        await until(lambda: status(instance, run_id) == ends, 10, f"the run {ends.value}")
        await until(lambda: not claimed(instance), 10, "the slot freed")
        assert failed[0] == 1

    run(scenario)


def test_a_stopped_step_of_a_cancelled_run_frees_its_slot_though_the_first_free_fails(
    worker: Worker, instance: DagsterInstance, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step task: its run's process stopped reading the step's end at the interrupt."""
    run_id = started_run(instance, tmp_path)
    holding_a_slot(instance, run_id, "sleeper")

    async def scenario() -> None:
        _held, child = await hold(worker, run_id, "sleeper")
        storage = instance.event_log_storage
        failed = fail_next(monkeypatch, storage, "free_concurrency_slot_for_step", 1)
        instance.report_run_canceling(read(instance, run_id))
        await worker.check_held()
        await asyncio.wait_for(child, 10)
        await until(lambda: not claimed(instance), 10, "the slot freed")
        assert failed[0] == 1

    run(scenario)


def test_a_step_of_a_live_run_leaves_its_slot_to_the_run(
    worker: Worker, instance: DagsterInstance, tmp_path: Path
) -> None:
    """The run's executor frees it on reading the step's end, and may claim it again for a
    retry: the worker must not free that one."""
    run_id = started_run(instance, tmp_path)
    holding_a_slot(instance, run_id, "sleeper")

    async def scenario() -> None:
        held, child = await hold(worker, run_id, "sleeper")
        held.process.kill()
        await asyncio.wait_for(child, 10)
        await until(lambda: held.settled.is_set(), 10, "settled")
        assert claimed(instance) == [(run_id, "sleeper")]

    run(scenario)


def pending(instance: DagsterInstance, run_id: str) -> list[str]:
    info = instance.event_log_storage.get_concurrency_info(POOL)
    return [step.step_key for step in info.pending_steps if step.run_id == run_id]


def test_a_killed_taskiq_run_frees_the_claims_of_steps_it_never_sent(
    worker: Worker, instance: DagsterInstance, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its process died holding one step waiting for a slot and one sent (held elsewhere): the
    waiting one is freed, past a fault; the sent one stays its holder's to free."""
    config = {"ops": {"pooled": {"config": {"marker_dir": str(tmp_path)}}}}
    run_id = instance.create_run_for_job(pooled_job, run_config=config).run_id
    for kind in [DagsterEventType.RUN_STARTING, DagsterEventType.RUN_START]:
        event = DagsterEvent(kind.value, job_name=pooled_job.name)
        instance.report_dagster_event(event, run_id)
    claims.record_sent(instance, run_id, run_id)
    storage = instance.event_log_storage
    storage.set_concurrency_slots(POOL, 2)
    assert storage.claim_concurrency_slot(POOL, run_id, "sent").is_claimed
    assert storage.claim_concurrency_slot(POOL, "another-run", "theirs").is_claimed
    assert not storage.claim_concurrency_slot(POOL, run_id, "waiting").is_claimed
    assert "waiting" in pending(instance, run_id)

    async def scenario() -> None:
        _held, child = await hold(worker, run_id)
        instance.report_run_canceling(read(instance, run_id))
        failed = fail_next(monkeypatch, storage, "get_concurrency_keys", 1)
        await worker.check_held()
        await asyncio.wait_for(child, 10)
        await until(lambda: "waiting" not in pending(instance, run_id), 10, "the claim freed")
        assert failed[0] == 1
        assert set(claimed(instance)) == {("another-run", "theirs"), (run_id, "sent")}

    run(scenario)


def test_a_cancelled_runs_step_skipped_at_dequeue_frees_its_slot_unless_claimed(
    instance: DagsterInstance, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sent, but its run cancelled before any worker took it: the skipping worker frees its
    slot (a failed free hands the task back, and the next try frees it); a task another worker
    claimed is left to that worker."""
    run_id = started_run(instance, tmp_path)
    holding_a_slot(instance, run_id, "sleeper")
    instance.report_run_canceling(read(instance, run_id))
    gate = Gate(instance, "worker-b", tmp_path)
    claims.claim(instance, f"{run_id}-sleeper-0", "worker-a")
    assert gate.admit(f"{run_id}-sleeper-0", run_id, "sleeper", 0, False) is not None
    assert claimed(instance) == [(run_id, "sleeper")], "worker-a holds it"
    task_id = f"{run_id}-sleeper-1"
    fail_next(monkeypatch, instance.event_log_storage, "free_concurrency_slot_for_step", 1)
    with pytest.raises(NotClaimed):
        gate.admit(task_id, run_id, "sleeper", 1, False)
    assert gate.admit(task_id, run_id, "sleeper", 1, False) == DagsterRunStatus.CANCELING
    assert not claimed(instance)
