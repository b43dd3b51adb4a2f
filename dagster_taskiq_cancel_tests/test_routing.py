"""Pools: runs and steps go to the queue their tags or code location name, workers serve the
pools they are told, priority lanes are drained highest first, and a missing queue fails the
launch."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from dagster import DagsterRun, DagsterRunStatus
from dagster._core.remote_origin import (
    RegisteredCodeLocationOrigin,
    RemoteJobOrigin,
    RemoteRepositoryOrigin,
)

from dagster_taskiq_cancel import claims
from dagster_taskiq_cancel.broker import CancellableSqsBroker
from dagster_taskiq_cancel.local_sqs import LocalSqsServer
from dagster_taskiq_cancel.queues import DEFAULT_POOL, QueueNames, SqsError, SyncQueues
from dagster_taskiq_cancel.routing import PRIORITY_TAG, run_pool, task_queue
from dagster_taskiq_cancel.settings import TaskiqCancelSettings
from dagster_taskiq_cancel.tasks import QUEUE_TAG, RECEIVED_FROM, run_task_message
from dagster_taskiq_cancel_tests.jobs import sleepy_job
from dagster_taskiq_cancel_tests.routed_jobs import (
    cpu_job_with_a_gpu_step,
    gpu_job,
    job_with_an_op_on_a_missing_pool,
)
from dagster_taskiq_cancel_tests.stack import (
    MOTO_ONLY,
    Deployment,
    descendant_pids,
    pid_alive,
    wait_for,
)
from dagster_taskiq_cancel_tests.step_jobs import fan_run_config, step_records

RUN_TIMEOUT = 180  # Dagster processes need seconds each to start on this 2-core machine


def _run(tags: dict[str, str], location: str | None = None) -> DagsterRun:
    origin = None
    if location is not None:
        repository = RemoteRepositoryOrigin(RegisteredCodeLocationOrigin(location), "repo")
        origin = RemoteJobOrigin(repository, "job")
    return DagsterRun(job_name="job", run_id="r", tags=tags, remote_job_origin=origin)


def test_a_run_goes_to_its_tag_else_its_locations_pool_else_the_main_queue() -> None:
    settings = TaskiqCancelSettings(queue_name="q", location_queues="etl=cpu, ml=gpu")
    assert run_pool(_run({QUEUE_TAG: "gpu"}, "etl"), settings) == "gpu"
    assert run_pool(_run({}, "etl"), settings) == "cpu"
    assert run_pool(_run({}, "other"), settings) == DEFAULT_POOL
    assert run_pool(_run({}), settings) == DEFAULT_POOL
    names = QueueNames.from_setting("q")
    assert task_queue(names, settings, "gpu", {PRIORITY_TAG: "5"}) == "q-gpu"  # lanes are off
    assert task_queue(names, settings, DEFAULT_POOL) == "q"
    assert task_queue(names, settings, "q") == "q"  # an earlier version's tag: the main queue
    lanes = settings.model_copy(update={"priority_lanes": True})
    assert task_queue(names, lanes, "gpu", {}, {PRIORITY_TAG: "5"}) == "q-gpu-high"
    assert task_queue(names, lanes, "gpu", {PRIORITY_TAG: "0"}, {PRIORITY_TAG: "5"}) == "q-gpu"
    fifo = QueueNames.from_setting("q.fifo")
    assert fifo.lane_queue(fifo.pool_queue("gpu"), high=True) == "q-gpu-high.fifo"
    for bad in ("cancels", "cancel-acks", "w-1", "gpu-high", "a b", ""):
        with pytest.raises(SqsError, match="not a usable pool name"):
            names.pool_queue(bad)


def test_a_run_routed_to_a_missing_queue_fails_with_the_fix_and_nothing_is_sent(
    deployment: Deployment,
) -> None:
    """Tagged on the run, or on its op alone (as an asset's ``op_tags``): the run's pool."""
    tagged_run = deployment.create_run(sleepy_job, tags={QUEUE_TAG: "nosuch"})
    tagged_op = deployment.create_run(job_with_an_op_on_a_missing_pool, run_config={})
    for run in (tagged_run, tagged_op):
        with pytest.raises(SqsError):
            deployment.instance.launch_run(run.run_id, workspace=None)  # type: ignore[arg-type]
        assert deployment.status(run.run_id) == DagsterRunStatus.FAILURE
        reason = "\n".join(deployment.engine_messages(run.run_id))
        assert f"routed to pool 'nosuch' ({QUEUE_TAG} tag" in reason
        assert "dagster-taskiq-cancel queues create --queue nosuch" in reason
        assert claims.sent_of(deployment.instance, run.run_id) is None
    assert deployment.queue_empty()


def test_a_worker_takes_the_high_lane_first_when_its_one_slot_frees(
    tmp_path: Path, sqs_server: LocalSqsServer
) -> None:
    """Lanes are queues, never delays: a task sent to the high lane after normal ones is taken
    first when the slot frees, whether it was sent before the slot was taken or while it was
    busy."""
    stack = Deployment(tmp_path, sqs_server.endpoint_url, priority_lanes=True, wait_time_seconds=1)
    try:
        names = stack.queues.names
        high = names.lane_queue(names.main, high=True)

        def send(queue: str, run_id: str) -> None:
            stack.queues.send(queue, run_task_message(run_id).body, run_id, run_id)

        async def taken() -> list[tuple[str, str]]:
            broker = CancellableSqsBroker(stack.settings)
            await broker.startup()
            listening = broker.listen()
            try:
                send(names.main, "normal-1")
                send(high, "high-1")
                send(names.main, "normal-2")
                # The slot is busy until the test asks for the next task.
                order = [await _task(broker, await anext(listening)) for _ in range(2)]
                send(high, "high-2")
                order += [await _task(broker, await anext(listening)) for _ in range(2)]
            finally:
                await listening.aclose()
                await broker.release_unstarted()
                await broker.release_late()
                await broker.shutdown()
            return order

        order = asyncio.run(taken())
        assert [run_id for run_id, _ in order] == ["high-1", "normal-1", "high-2", "normal-2"]
        assert dict(order) == {
            "high-1": high,
            "normal-1": names.main,
            "high-2": high,
            "normal-2": names.main,
        }
    finally:
        stack.stop()


async def _task(broker: CancellableSqsBroker, message: object) -> tuple[str, str]:
    task = broker.formatter.loads(message.data)  # type: ignore[attr-defined]
    await message.ack()  # type: ignore[attr-defined]
    return task.task_id, task.labels[RECEIVED_FROM]


@MOTO_ONLY
def test_gpu_work_runs_only_on_the_gpu_worker_and_terminate_stops_it(
    deployment: Deployment,
) -> None:
    """A job tagged `gpu`, and a `gpu` step of a `cpu` run: each runs on the `gpu` worker only,
    and Terminate stops it there through the shared cancel path."""
    pools = deployment.settings.model_copy(update={"serve_queues": "cpu,gpu"})
    SyncQueues(pools).create_all()
    deployment.start_worker("--queue", "cpu")
    gpu = deployment.start_worker("--queue", "gpu")
    deadline = deployment.settings.grace_seconds + deployment.settings.poll_interval_seconds + 15

    run_id = deployment.launch(gpu_job, seconds=600)
    op_pid = deployment.op_pid(run_id, RUN_TIMEOUT)
    assert op_pid in descendant_pids(gpu.pid)
    started = time.monotonic()
    assert deployment.instance.run_launcher.terminate(run_id)
    wait_for(lambda: not pid_alive(op_pid), deadline, "the gpu run's op process gone")
    print(f"\ngpu run: terminate -> op process gone {time.monotonic() - started:.3f}s")
    deployment.wait_status(run_id, {DagsterRunStatus.CANCELED})
    assert run_id not in deployment.worker_log(0)  # the cpu worker never saw it

    run_config = fan_run_config(deployment.root, seconds=600)
    step_run = deployment.launch(cpu_job_with_a_gpu_step, run_config=run_config)
    (record,) = wait_for(
        lambda: step_records(deployment.markers, step_run), RUN_TIMEOUT, "the gpu step running"
    )
    assert record.worker_pid == gpu.pid
    assert deployment.tags(step_run)["dagster-taskiq/worker_id"].split(":")[1] != str(gpu.pid)
    started = time.monotonic()
    assert deployment.instance.run_launcher.terminate(step_run)
    wait_for(lambda: not pid_alive(record.pid), deadline, "the gpu step's process gone")
    print(f"gpu step: terminate -> step process gone {time.monotonic() - started:.3f}s")
    deployment.wait_status(step_run, {DagsterRunStatus.CANCELED}, timeout=60)
