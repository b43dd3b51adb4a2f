"""Load with faults: runs terminated at random moments (some before they start), a worker
SIGKILLed and restarted mid-way, duplicate deliveries. At the end every run is where it must be,
nothing ran twice, no child is left and the queues are empty. ``--soak-runs 200`` is the long form.
"""

from __future__ import annotations

import heapq
import random
import re
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from dagster import DagsterRunStatus

from dagster_taskiq_cancel.local_sqs import LocalSqsServer
from dagster_taskiq_cancel.tasks import WORKER_ID_TAG, run_task_message
from dagster_taskiq_cancel_tests.jobs import sleepy_job
from dagster_taskiq_cancel_tests.stack import (
    MOTO_ONLY,
    Deployment,
    child_pids,
    pid_alive,
    wait_for,
    worker_pid,
)
from dagster_taskiq_cancel_tests.test_sensor import acks_queue_empty, tick_until

pytestmark = [pytest.mark.postgres, MOTO_ONLY]

SEED = 20261123
WORKERS = 4
SLOTS = 3
Status = DagsterRunStatus
TERMINAL = {Status.SUCCESS, Status.FAILURE, Status.CANCELED}
LIVE = {Status.STARTING, Status.STARTED}
# Worker log lines: a task taken from the queue, and one dropped or skipped (not held).
RECEIVED = re.compile(r"with ID: (\S+)")
SET_ASIDE = re.compile(r"(?:Dropping|Skipping) (?:duplicate delivery of )?task ([^\s:]+)")


class Soak:
    """The runs of one soak, what was done to them, and the terminations still to send."""

    def __init__(self, deployment: Deployment, rng: random.Random) -> None:
        self.deployment = deployment
        self.rng = rng
        self.run_ids: list[str] = []
        self.terminated: dict[str, bool] = {}  # run id -> terminate()'s answer
        self.due: list[tuple[float, str]] = []  # (monotonic moment, run id), a heap
        self.duplicates = 0

    def launch(self) -> str:
        """Launch one run; terminate it now (before it starts), later, or never."""
        run_id = self.deployment.launch(sleepy_job, seconds=self.rng.uniform(0.1, 3.0))
        self.run_ids.append(run_id)
        plan = self.rng.random()
        if plan < 0.15:
            self.terminate(run_id)
        elif plan < 0.5:
            heapq.heappush(self.due, (time.monotonic() + self.rng.uniform(0, 6), run_id))
        if self.rng.random() < 0.2:
            self.duplicate(run_id)
        return run_id

    def terminate(self, run_id: str) -> None:
        self.terminated[run_id] = self.deployment.instance.run_launcher.terminate(run_id)

    def duplicate(self, run_id: str) -> None:
        """Deliver the run's task once more, as SQS may."""
        queues = self.deployment.queues
        queues.send(queues.names.main, run_task_message(run_id).body, run_id, uuid.uuid4().hex)
        self.duplicates += 1

    def terminate_due(self) -> bool:
        """Send the terminations whose moment has come; True once none is left."""
        now = time.monotonic()
        while self.due and self.due[0][0] <= now:
            self.terminate(heapq.heappop(self.due)[1])
        return not self.due


def busy_worker(deployment: Deployment, rng: random.Random) -> int | None:
    """The index of a live worker that is running a run right now, if any."""
    busy = [
        index
        for index, proc in enumerate(deployment.workers)
        if proc.poll() is None and child_pids(proc.pid, "execute_run")
    ]
    return rng.choice(busy) if busy else None


def kill_worker(deployment: Deployment, soak: Soak, index: int) -> set[str]:
    """SIGKILL a worker; fail the runs it held, as run monitoring would.

    Returns the runs the killed worker took with it: those it held, and those whose message it
    had received (and deleted) but neither claimed nor set aside.
    """
    victim = deployment.workers[index]
    victim.kill()
    victim.wait(30)
    log = deployment.worker_log(index)
    received = set(RECEIVED.findall(log)) - set(SET_ASIDE.findall(log))
    lost = set()
    for run_id in soak.run_ids:
        run = deployment.instance.get_run_by_id(run_id)
        assert run is not None
        holder = run.tags.get(WORKER_ID_TAG)
        held = holder is not None and worker_pid(holder) == victim.pid
        unclaimed = run_id in received and WORKER_ID_TAG not in run.tags
        if (held or unclaimed) and run.status not in TERMINAL:
            lost.add(run_id)
            if run.status in LIVE:
                deployment.instance.report_run_failed(run, message="Its worker was SIGKILLed.")
    return lost


@pytest.mark.timeout(1800)
def test_soak_terminate_kill_and_duplicates(
    tmp_path: Path,
    sqs_server: LocalSqsServer,
    storage: dict[str, Any],
    request: pytest.FixtureRequest,
) -> None:
    count: int = request.config.getoption("--soak-runs")
    rng = random.Random(SEED)
    deployment = Deployment(
        tmp_path,
        sqs_server.endpoint_url,
        # As documented for production. Without it, Dagster fails a run whose run process starts
        # after a terminate landed (it sees CANCELING); with it, it leaves the run CANCELING for
        # the worker's stop and the sensor, and the run ends CANCELED.
        instance_config={**storage, "run_monitoring": {"enabled": True}},
        # A message the killed worker received but never deleted comes back soon.
        visibility_timeout_seconds=10,
    )
    started = time.monotonic()
    try:
        for _ in range(WORKERS):
            deployment.start_worker("--concurrency", str(SLOTS))
        soak = Soak(deployment, rng)
        lost: set[str] | None = None
        for index in range(count):
            soak.launch()
            soak.terminate_due()
            # From the middle on, kill the first worker seen running a run, then replace it.
            victim = busy_worker(deployment, rng) if lost is None and index >= count // 2 else None
            if victim is not None:
                lost = kill_worker(deployment, soak, victim)
                deployment.start_worker("--concurrency", str(SLOTS))
        assert lost is not None, "no worker was running a run in the second half"
        for run_id in rng.sample(soak.run_ids, min(5, count)):
            soak.duplicate(run_id)  # most of these have finished: a late redelivery
        wait_for(soak.terminate_due, 60, "every planned terminate sent", interval=0.05)

        statuses: dict[str, Status] = {}

        def settled() -> bool:
            statuses.update({r: deployment.status(r) for r in soak.run_ids})
            return (
                all(s in TERMINAL for s in statuses.values())
                and deployment.queue_empty()
                and acks_queue_empty(deployment)
            )

        # The sensor ends skipped and killed runs, and times out those the dead worker held.
        tick_until(deployment, settled, timeout=120 + 3 * count, cancel_timeout_seconds=10)

        canceled = {r for r, ok in soak.terminated.items() if ok}
        for run_id in soak.run_ids:
            status = statuses[run_id]
            if run_id in lost:
                assert status in {Status.FAILURE, Status.CANCELED}, (run_id, status)
            elif run_id in canceled:
                # Never FAILURE, also when terminated while Dagster starts the run; SUCCESS
                # only if the run finished while the cancel was on its way.
                assert status in {Status.CANCELED, Status.SUCCESS}, (run_id, status)
            else:
                assert status == Status.SUCCESS, (run_id, status)
        executions = {r: deployment.executions(r) for r in soak.run_ids}
        assert max(executions.values()) <= 1, "a run executed twice"
        pids = [int(p.read_text()) for p in deployment.markers.glob("*.pid") if p.read_text()]
        wait_for(lambda: not any(pid_alive(p) for p in pids), 30, "every op process gone")
        assert not [p for w in deployment.workers for p in child_pids(w.pid, "dagster")]

        by_status = Counter(s.value for s in statuses.values())
        print(
            f"\nsoak ({sqs_server.label}, seed {SEED}, {time.monotonic() - started:.0f}s): "
            f"{count} runs on {WORKERS} workers x {SLOTS} slots; "
            f"terminate() sent {len(soak.terminated)}, recorded {len(canceled)} "
            f"({sum(executions[r] == 0 for r in canceled)} never started, "
            f"{sum(statuses[r] == Status.SUCCESS for r in canceled)} finished first); "
            f"{soak.duplicates} duplicate deliveries; killed worker took {len(lost)} run(s) "
            f"(marked FAILURE: {sum(statuses[r] == Status.FAILURE for r in lost)}); "
            f"final {dict(by_status)}; executions per run max {max(executions.values())}, "
            f"total {sum(executions.values())}; main and cancels queues empty, acks drained"
        )
    finally:
        deployment.stop()
