"""Postgres paused for longer than the fence time: every run ends truthfully once it answers.

Real parts: a worker process, real `dagster api` children, the private Postgres cluster stopped
with SIGSTOP (the postmaster first, so that no new backend starts, then every backend) and
continued with SIGCONT. The heartbeat timeout is short so that the worker fences early in the
pause; the pause is still longer than any of the worker's own waits.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from dagster import DagsterRunStatus

from dagster_taskiq_cancel.local_sqs import LocalSqsServer
from dagster_taskiq_cancel.tasks import RELEASED_TAG, WORKER_ID_TAG
from dagster_taskiq_cancel_tests.jobs import sleepy_job
from dagster_taskiq_cancel_tests.postgres import PostgresCluster, storage_config
from dagster_taskiq_cancel_tests.stack import (
    MOTO_ONLY,
    Deployment,
    descendant_pids,
    monitor_until,
    pid_alive,
    wait_for,
)

HEARTBEAT_TIMEOUT = 9.0  # fence 6 s after the last beat; settles retried every 1.5 s at most
PAUSE = 35.0


@contextlib.contextmanager
def paused(cluster: PostgresCluster) -> Iterator[None]:
    """Postgres stopped (SIGSTOP) for the block, always continued afterwards."""
    assert cluster.process is not None
    postmaster = cluster.process.pid
    stopped = [postmaster]
    try:
        os.kill(postmaster, signal.SIGSTOP)  # first: no backend starts after this
        for pid in descendant_pids(postmaster):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
                stopped.append(pid)
        yield
    finally:
        for pid in reversed(stopped):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


@MOTO_ONLY
def test_a_postgres_pause_ends_held_and_terminated_runs_truthfully(
    tmp_path: Path, sqs_server: LocalSqsServer, postgres_cluster: PostgresCluster
) -> None:
    """A held run is failed by run monitoring, released by its worker; a run terminated during
    the pause ends CANCELED. Each within its bound of the storage answering again."""
    instance_config = {
        **storage_config(postgres_cluster.database()),
        "run_monitoring": {"enabled": True, "max_resume_run_attempts": 0},
    }
    deployment = Deployment(
        tmp_path,
        sqs_server.endpoint_url,
        instance_config=instance_config,
        heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT,
        cancel_timeout_seconds=600,  # the sensor's timeout must not be what ends the cancel
    )
    terminating: threading.Thread | None = None
    try:
        deployment.start_worker()
        held, terminated = (deployment.launch(sleepy_job, seconds=300) for _ in range(2))
        pids = [deployment.op_pid(held), deployment.op_pid(terminated)]
        for run_id in (held, terminated):
            deployment.wait_status(run_id, {DagsterRunStatus.STARTED})
        holder = deployment.tags(held)[WORKER_ID_TAG]
        launcher = deployment.instance.run_launcher
        with paused(postgres_cluster):
            started = time.monotonic()
            terminating = threading.Thread(target=launcher.terminate, args=(terminated,))
            terminating.start()  # its CANCELING write waits for the storage
            wait_for(lambda: not any(map(pid_alive, pids)), PAUSE, "both ops killed")
            fenced_after = time.monotonic() - started
            time.sleep(max(0.0, PAUSE - (time.monotonic() - started)))  # the outage goes on
        answered = time.monotonic()
        print(f"\nops killed {fenced_after:.1f}s into a {PAUSE:g}s Postgres pause")
        assert fenced_after < HEARTBEAT_TIMEOUT, "killed before run monitoring could resume"
        terminating.join(60)
        # Bound: one settle backoff (heartbeat_timeout / 6) plus the storage calls queued
        # during the pause, then one poll interval for the cancel.
        deployment.wait_status(terminated, {DagsterRunStatus.CANCELED}, timeout=30)
        canceled_after = time.monotonic() - answered
        wait_for(lambda: deployment.tags(held).get(RELEASED_TAG) == holder, 30, "released")
        released_after = time.monotonic() - answered
        monitor_until(
            deployment,
            lambda: deployment.status(held) == DagsterRunStatus.FAILURE,
            30,
            "run monitoring fails the released run",
        )
        print(
            f"after SIGCONT: CANCELED in {canceled_after:.1f}s, released in {released_after:.1f}s"
        )
        why = deployment.engine_messages(held)
        assert any(holder in m and "could not write its heartbeat" in m for m in why), why
        assert any(holder in m and "released the run" in m for m in why), why
        assert any("killed earlier" in m for m in deployment.engine_messages(terminated))
    finally:
        if terminating is not None:
            terminating.join(60)
        deployment.stop()
