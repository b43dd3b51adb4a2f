"""Dagster concurrency pool slots that a stopped step or run would otherwise keep forever.

Dagster's run process claims a pool slot for a step before it launches it, and frees it when it
reads the step's end from the event log. An interrupted executor stops reading at once (its
``InstanceConcurrencyContext`` frees only the claims still pending), and a killed run process
frees nothing: each step it had launched kept its slot until somebody freed it by hand or run
monitoring's ``free_slots_after_run_end_seconds`` passed. The worker that saw the step's (or the
run's) processes gone frees them instead, and only once the run is cancelled or ended: then no
run process will read the step's end, nor launch a retry that the slot now belongs to.
"""

from __future__ import annotations

from dagster import DagsterInstance, DagsterRun

from dagster_taskiq_cancel import claims
from dagster_taskiq_cancel.worker.authority import is_cancelled


def past_its_executor(run: DagsterRun) -> bool:
    """Whether the run's executor no longer frees slots: the run is cancelled or ended."""
    return is_cancelled(run.status) or run.is_finished


def free_step(instance: DagsterInstance, run_id: str, step_key: str) -> None:
    """Free the slot of a step whose processes are gone (a no-op if it holds none)."""
    storage = instance.event_log_storage
    if storage.supports_global_concurrency_limits:
        storage.free_concurrency_slot_for_step(run_id, step_key)


def free_run(instance: DagsterInstance, run_id: str) -> None:
    """Free every slot and pending claim of a run none of whose processes run any more."""
    storage = instance.event_log_storage
    if storage.supports_global_concurrency_limits:
        storage.free_concurrency_slots_for_run(run_id)


def free_unclaimed_step(
    instance: DagsterInstance, run_id: str, step_key: str, task_id: str
) -> None:
    """Free the slot of a cancelled run's step task skipped at dequeue, unless a worker claimed
    the task: that worker frees it once the step's processes are gone."""
    if claims.claim_of(instance, task_id) is None:
        free_step(instance, run_id, step_key)


def free_unsent(instance: DagsterInstance, run_id: str) -> None:
    """Free the claims of a run's steps that its executor never sent: those still waiting for
    a slot, or holding one it got just before its process was killed. A sent step holds its
    slot until its own holder frees it."""
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return
    for pool in storage.get_concurrency_keys():
        info = storage.get_concurrency_info(pool)
        holding = {slot.step_key for slot in info.claimed_slots if slot.run_id == run_id}
        for pending in info.pending_steps:
            if pending.run_id == run_id and pending.step_key not in holding:
                storage.free_concurrency_slot_for_step(run_id, pending.step_key)
