"""Per-worker hint queues: the hint reaches the holder at once, is only a hint, and the queues
live exactly as long as their workers."""

from __future__ import annotations

import re
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from dagster import DagsterRun, DagsterRunStatus

from dagster_taskiq_cancel import heartbeats, hints
from dagster_taskiq_cancel.local_sqs import LocalSqsServer
from dagster_taskiq_cancel.messages import CancelRequest
from dagster_taskiq_cancel.queues import QueueNames
from dagster_taskiq_cancel.tasks import CLAIM_TAG, WORKER_ID_TAG
from dagster_taskiq_cancel_tests.jobs import sleepy_job
from dagster_taskiq_cancel_tests.stack import (
    MOTO_ONLY,
    Deployment,
    pid_alive,
    stop_process,
    wait_for,
    worker_pid,
)
from dagster_taskiq_cancel_tests.step_jobs import fan_job, fan_run_config, step_records

READY = re.compile(r"worker (\S+) ready")
# Far beyond every deadline below: only a hint can stop a run this fast.
SLOW_POLL = 60.0
HINT_DEADLINE_S = 3.0
STEP_DEADLINE_S = 15.0  # a step process's own interrupt handling takes seconds on 2 cores


@pytest.fixture
def slow_poll(tmp_path: Path, sqs_server: LocalSqsServer) -> Iterator[Deployment]:
    with Deployment(tmp_path, sqs_server.endpoint_url, poll_interval_seconds=SLOW_POLL) as stack:
        yield stack


def worker_id(deployment: Deployment, index: int) -> str:
    match = READY.search(deployment.worker_log(index))
    assert match, deployment.worker_log(index)
    return match[1]


def hint_queue_names(deployment: Deployment) -> set[str]:
    return {url.rsplit("/", 1)[-1] for url in hints.listed(deployment.queues)}


@MOTO_ONLY
def test_hint_reaches_the_holder_and_only_the_holder(slow_poll: Deployment) -> None:
    """Three runs on three workers: each holder hears its run's hint on its own queue and stops
    it long before its poll would; no other worker reads that hint."""
    for _ in range(3):
        slow_poll.start_worker("--concurrency", "1")
    ids = {worker_id(slow_poll, i): i for i in range(3)}
    run_ids = [slow_poll.launch(sleepy_job, seconds=300) for _ in range(3)]
    pids = {run_id: slow_poll.op_pid(run_id, timeout=120) for run_id in run_ids}
    for run_id in run_ids:
        slow_poll.wait_status(run_id, {DagsterRunStatus.STARTED})
    holder_of = {run_id: slow_poll.tags(run_id)[WORKER_ID_TAG] for run_id in run_ids}
    assert sorted(holder_of.values()) == sorted(ids), "one run per one-slot worker"

    for run_id in run_ids:
        assert slow_poll.instance.run_launcher.terminate(run_id)
        wait_for(lambda p=pids[run_id]: not pid_alive(p), HINT_DEADLINE_S, f"{run_id} stopped")
    for run_id in run_ids:
        slow_poll.wait_status(run_id, {DagsterRunStatus.CANCELED}, timeout=30)
    for run_id, holder in holder_of.items():
        own = hints.hint_queue_name(slow_poll.queues.names, holder)
        assert f"Cancel hint for held run {run_id} from {own}" in slow_poll.worker_log(ids[holder])
        for other, index in ids.items():
            if other != holder:
                assert f"{run_id} from {own}" not in slow_poll.worker_log(index)


@MOTO_ONLY
def test_steps_hear_the_hint_on_their_holders_queues(slow_poll: Deployment) -> None:
    """A run whose steps run as tasks on other workers: every worker holding a step hears the
    hint on its own queue, and every step process is gone long before a poll would act."""
    for _ in range(3):
        slow_poll.start_worker("--concurrency", "2")
    ids = {worker_pid(worker_id(slow_poll, i)): (worker_id(slow_poll, i), i) for i in range(3)}
    run_id = slow_poll.launch(
        fan_job, run_config=fan_run_config(slow_poll.root, width=4, seconds=600)
    )
    parts = wait_for(
        lambda: (
            [r for r in step_records(slow_poll.markers, run_id) if r.step_key != "fan_out"]
            if len(step_records(slow_poll.markers, run_id)) == 5
            else []
        ),
        180,
        "4 running steps",
    )
    assert slow_poll.instance.run_launcher.terminate(run_id)
    wait_for(
        lambda: not any(pid_alive(r.pid) for r in parts), STEP_DEADLINE_S, "step processes gone"
    )
    for holder_pid in {r.worker_pid for r in parts}:
        holder, index = ids[holder_pid]
        own = hints.hint_queue_name(slow_poll.queues.names, holder)
        assert f"Cancel hint for held run {run_id} from {own}" in slow_poll.worker_log(index)
    slow_poll.wait_status(run_id, {DagsterRunStatus.CANCELED}, timeout=60)


@MOTO_ONLY
def test_forged_hint_on_a_worker_queue_kills_nothing(slow_poll: Deployment) -> None:
    """A well-formed request for a live run, and garbage, sent straight to the holder's queue:
    both are read and deleted, the run goes on."""
    slow_poll.start_worker()
    holder = worker_id(slow_poll, 0)
    run_id = slow_poll.launch(sleepy_job, seconds=300)
    pid = slow_poll.op_pid(run_id, timeout=120)
    slow_poll.wait_status(run_id, {DagsterRunStatus.STARTED})
    queue = hints.hint_queue_name(slow_poll.queues.names, holder)
    slow_poll.queues.remember_url(queue, hints.hint_url(slow_poll.queues, queue))
    forged = CancelRequest(run_id=run_id, reason="forged", requested_by="mallory").to_json()
    for body in (forged, "not json"):
        slow_poll.queues.send(queue, body, group_id=run_id, dedup_id=body[:64])

    wait_for(
        lambda: (
            "Deleting malformed cancel message" in slow_poll.worker_log(0)
            and f"Cancel hint for held run {run_id} from {queue}" in slow_poll.worker_log(0)
        ),
        30,
        "both messages read",
    )
    assert pid_alive(pid)
    assert slow_poll.status(run_id) == DagsterRunStatus.STARTED
    assert f"Stopping task {run_id}" not in slow_poll.worker_log(0)
    # The worker still hears a real cancel at once.
    assert slow_poll.instance.run_launcher.terminate(run_id)
    wait_for(lambda: not pid_alive(pid), HINT_DEADLINE_S, "run stopped by the real cancel")


@MOTO_ONLY
def test_queue_and_heartbeat_deleted_at_clean_shutdown(slow_poll: Deployment) -> None:
    proc = slow_poll.start_worker()
    own_id = worker_id(slow_poll, 0)
    queue = hints.hint_queue_name(slow_poll.queues.names, own_id)
    assert queue in hint_queue_names(slow_poll)
    assert heartbeats.last_beat(slow_poll.instance, own_id) is not None
    stop_process(proc)
    assert proc.returncode == 0
    assert queue not in hint_queue_names(slow_poll)
    assert heartbeats.last_beat(slow_poll.instance, own_id) is None


@MOTO_ONLY
def test_dead_workers_queue_removed_by_the_next_worker(
    tmp_path: Path, sqs_server: LocalSqsServer
) -> None:
    """SIGKILL leaves the queue and the heartbeat row; once the heartbeat is stale, the next
    worker's sweep deletes both as it starts serving (and keeps its own)."""
    with Deployment(tmp_path, sqs_server.endpoint_url, heartbeat_timeout_seconds=2) as deployment:
        dead = deployment.start_worker()
        dead_id = worker_id(deployment, 0)
        dead_queue = hints.hint_queue_name(deployment.queues.names, dead_id)
        stop_process(dead, signal.SIGKILL)
        assert dead_queue in hint_queue_names(deployment)
        wait_for(
            lambda: heartbeats.why_stale(heartbeats.last_beat(deployment.instance, dead_id), 2),
            30,
            "dead worker's heartbeat stale",
            interval=0.2,
        )
        deployment.start_worker()
        live_id = worker_id(deployment, 1)
        wait_for(
            lambda: f"heartbeat of dead worker {dead_id}" in deployment.worker_log(1),
            30,
            "dead worker swept",
        )
        assert hint_queue_names(deployment) == {
            hints.hint_queue_name(deployment.queues.names, live_id)
        }
        assert heartbeats.last_beat(deployment.instance, dead_id) is None
        assert heartbeats.last_beat(deployment.instance, live_id) is not None


@pytest.mark.parametrize("main", ["jobs", "jobs.fifo", "x" * 80, "y" * 75 + ".fifo"])
def test_hint_queue_names_fit_sqs_rules(main: str) -> None:
    names = QueueNames.from_setting(main)
    worker = "ip-10-0-0-1.eu-west-1.compute.internal:4711:0a1b2c3d"
    name = hints.hint_queue_name(names, worker)
    assert len(name) <= 80
    assert name.endswith(".fifo") == names.fifo
    assert re.fullmatch(r"[A-Za-z0-9_-]+", name.removesuffix(".fifo"))
    assert name.startswith(hints.hint_prefix(names))
    assert name != hints.hint_queue_name(names, worker[:-1] + "e")


def test_holders_are_the_run_tasks_claimer_and_every_step_claimer() -> None:
    """A parent's tags, copied to a re-execution, name the parent's holders: not hinted."""
    tags = {
        WORKER_ID_TAG: "parent:1:x",
        CLAIM_TAG: "parent:1:x/n1",
        f"{CLAIM_TAG}/parent:step_one:0": "parent:2:y/n0",
        f"{CLAIM_TAG}/r:step_one:0": "b:2:y/n2",
        f"{CLAIM_TAG}/r:step_two:0": "c:3:z/n3",
        f"{CLAIM_TAG}/r:step_three:0": "not a token",
        "dagster-taskiq/queue": "q",
    }
    assert hints.holders(DagsterRun(job_name="j", run_id="r", tags=tags), "a:1:x") == {
        "a:1:x",
        "b:2:y",
        "c:3:z",
    }


def test_a_fifo_deployment_runs_and_a_hint_stops_its_run(
    tmp_path: Path, sqs_server: LocalSqsServer
) -> None:
    """A `.fifo` queue name makes every queue FIFO, the worker's own hint queue too: a run
    succeeds, a hint stops a run long before the poll would, and the queue goes at shutdown."""
    with Deployment(
        tmp_path,
        sqs_server.endpoint_url,
        queue_name=f"t{uuid.uuid4().hex[:12]}.fifo",
        poll_interval_seconds=SLOW_POLL,
    ) as deployment:
        worker = deployment.start_worker()
        ok = deployment.launch(sleepy_job)
        deployment.wait_status(ok, {DagsterRunStatus.SUCCESS})
        run_id = deployment.launch(sleepy_job, seconds=300)
        pid = deployment.op_pid(run_id)
        deployment.wait_status(run_id, {DagsterRunStatus.STARTED})
        (queue,) = hint_queue_names(deployment)
        assert queue.endswith(".fifo"), queue
        started = time.monotonic()
        assert deployment.instance.run_launcher.terminate(run_id)
        wait_for(lambda: not pid_alive(pid), HINT_DEADLINE_S, "the run's process gone")
        print(f"\nFIFO terminate -> child gone: {time.monotonic() - started:.2f}s")
        deployment.wait_status(run_id, {DagsterRunStatus.CANCELED}, timeout=20)
        assert deployment.executions(ok) == 1
        stop_process(worker)
        assert worker.returncode == 0
        assert hint_queue_names(deployment) == set()
