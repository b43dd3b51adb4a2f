"""Dagster's concurrency pools hold across runs of taskiq_executor steps, and Terminate frees
the cancelled run's slot as soon as its step's processes are gone."""

from __future__ import annotations

import time

from dagster import DagsterEventType, DagsterRunStatus

from dagster_taskiq_cancel_tests.pool_jobs import POOL, pooled_job
from dagster_taskiq_cancel_tests.stack import MOTO_ONLY, Deployment, pid_alive, wait_for

STEP = "pooled"
RUN_TIMEOUT = 180  # a run process and a step process start in turn on a busy 2-core machine


def _step_events(deployment: Deployment, run_id: str) -> dict[DagsterEventType, float]:
    """When each of the step's own events was written (the first of each kind; engine events,
    which others write about the step, left out)."""
    found: dict[DagsterEventType, float] = {}
    for entry in deployment.instance.all_logs(run_id):
        event = entry.dagster_event
        if event is not None and event.step_key == STEP and not event.is_engine_event:
            found.setdefault(event.event_type, entry.timestamp)
    return found


def _sent_at(deployment: Deployment, run_id: str) -> float:
    """When the run's executor sent its step: the moment it held the pool's slot."""
    (sent,) = [
        entry.timestamp
        for entry in deployment.instance.all_logs(run_id)
        if entry.dagster_event is not None
        and entry.dagster_event.event_type == DagsterEventType.STEP_WORKER_STARTING
    ]
    return sent


def _claimed_by(deployment: Deployment) -> list[str]:
    info = deployment.instance.event_log_storage.get_concurrency_info(POOL)
    return [slot.run_id for slot in info.claimed_slots]


def _slot_freed(deployment: Deployment, run_id: str, asked: float) -> float:
    """Seconds from ``asked`` until no slot of the pool is claimed by ``run_id``."""
    wait_for(lambda: run_id not in _claimed_by(deployment), 30, f"the slot of {run_id} freed")
    return time.time() - asked


@MOTO_ONLY
def test_a_pool_of_one_holds_across_runs_and_terminate_frees_the_slot(
    deployment: Deployment,
) -> None:
    """Two runs at once, each one long step in a pool of one: one step waits for the other,
    and runs as soon as the other run is terminated; its own Terminate frees the slot too."""
    deployment.instance.event_log_storage.set_concurrency_slots(POOL, 1)
    deployment.start_worker("--concurrency", "4")
    runs = [deployment.launch(pooled_job, seconds=120) for _ in range(2)]

    def started() -> str | None:
        return next((r for r in runs if (deployment.markers / f"{r}.pid").exists()), None)

    first = wait_for(started, RUN_TIMEOUT, "one run's step started")
    (second,) = set(runs) - {first}
    first_pid = deployment.op_pid(first)

    def blocked() -> bool:
        messages = deployment.engine_messages(second)
        return any(f"blocked by limit for pool {POOL}" in m for m in messages)

    wait_for(blocked, RUN_TIMEOUT, "the other run's step waiting for the pool")
    assert _claimed_by(deployment) == [first]
    assert DagsterEventType.STEP_START not in _step_events(deployment, second)

    asked = time.time()
    assert deployment.instance.run_launcher.terminate(first)
    freed = _slot_freed(deployment, first, asked)
    second_pid = deployment.op_pid(second, RUN_TIMEOUT)
    assert deployment.status(first) == DagsterRunStatus.CANCELED
    assert not pid_alive(first_pid)
    first_events = _step_events(deployment, first)
    second_start = _step_events(deployment, second)[DagsterEventType.STEP_START]
    assert max(first_events.values()) <= second_start, "never two steps of the pool at once"

    asked_again = time.time()
    assert deployment.instance.run_launcher.terminate(second)
    freed_again = _slot_freed(deployment, second, asked_again)
    deployment.wait_status(second, {DagsterRunStatus.CANCELED}, 30)
    assert not pid_alive(second_pid)
    assert not _claimed_by(deployment)
    sent = _sent_at(deployment, second)
    print(
        f"terminate -> slot freed {freed:.2f}s (again: {freed_again:.2f}s); "
        f"-> the waiting run's step sent {sent - asked:.2f}s, started {second_start - asked:.2f}s"
    )
    # Freed once the step's process is gone: an interrupt, within one poll and the grace.
    bound = deployment.settings.poll_interval_seconds + deployment.settings.grace_seconds + 5
    assert freed < bound and freed_again < bound
