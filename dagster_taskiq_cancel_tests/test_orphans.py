"""Every process of a run dies with its worker, and with its run: the guard between the worker
and the Dagster child kills the multiprocess executor's step processes and what they started."""

from __future__ import annotations

import os
import signal
from typing import Any

from dagster import DagsterRunStatus

from dagster_taskiq_cancel_tests.jobs import multiprocess_job, session_spawner_job
from dagster_taskiq_cancel_tests.stack import (
    MOTO_ONLY,
    Deployment,
    descendant_pids,
    pid_alive,
    wait_for,
)
from dagster_taskiq_cancel_tests.test_graceful import reconcile_until

pytestmark = MOTO_ONLY


def _start(deployment: Deployment) -> tuple[str, set[int]]:
    """A multiprocess run with both ops and the helper up; every process below the worker."""
    config: dict[str, Any] = {"marker_dir": str(deployment.markers), "seconds": 300}
    run_id = deployment.launch(
        multiprocess_job,
        run_config={"ops": {"sleeper": {"config": config}, "spawner": {"config": config}}},
    )
    helper = deployment.markers / f"{run_id}.helper"
    wait_for(lambda: deployment.executions(run_id) == 2 and helper.exists(), 120, "both ops up")
    executions = (deployment.markers / f"{run_id}.executions").read_text()
    watched = {*map(int, executions.split()), int(helper.read_text())}
    processes = descendant_pids(deployment.workers[0].pid)
    # guard, run process, two step processes, the helper, and multiprocessing's own helpers
    assert watched <= processes and len(processes) >= 5, (watched, processes)
    return run_id, processes


def test_sigkilled_worker_takes_every_process_of_its_run_with_it(deployment: Deployment) -> None:
    worker = deployment.start_worker()
    _, processes = _start(deployment)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    wait_for(
        lambda: not any(pid_alive(pid) for pid in processes),
        10,
        f"every process of the run gone: {[p for p in processes if pid_alive(p)]}",
    )


def test_terminate_ends_a_multiprocess_run_canceled_and_leaves_nothing(
    deployment: Deployment,
) -> None:
    # The multiprocess executor takes seconds to wind its step processes down (3 s on a quiet
    # machine): a grace long enough that Dagster, not SIGKILL, ends the run.
    worker = deployment.start_worker("--grace-seconds", "60")
    run_id, processes = _start(deployment)
    deployment.wait_status(run_id, {DagsterRunStatus.STARTED})
    assert deployment.instance.run_launcher.terminate(run_id)
    deployment.wait_status(run_id, {DagsterRunStatus.CANCELED}, timeout=30)
    wait_for(
        lambda: not any(pid_alive(pid) for pid in processes),
        15,
        f"every process of the run gone: {[p for p in processes if pid_alive(p)]}",
    )
    assert worker.poll() is None
    assert "exit code 0" in deployment.worker_log(0), "Dagster's interrupt ended the run"


def test_sigkill_after_grace_reaches_a_process_in_its_own_session(deployment: Deployment) -> None:
    """The op ignores the interrupt and its helper left the task's process group: the SIGKILL
    after grace goes through the guard, which kills every descendant, whatever its session."""
    deployment.start_worker("--grace-seconds", "1")
    run_id = deployment.launch(session_spawner_job, seconds=300)
    op_pid = deployment.op_pid(run_id)
    helper_file = deployment.markers / f"{run_id}.helper"
    helper = int(wait_for(lambda: helper_file.exists() and helper_file.read_text(), 60, "helper"))
    assert os.getsid(helper) != os.getsid(op_pid), "the helper should lead a session of its own"
    deployment.wait_status(run_id, {DagsterRunStatus.STARTED})
    assert deployment.instance.run_launcher.terminate(run_id)
    try:
        wait_for(lambda: not pid_alive(op_pid) and not pid_alive(helper), 20, "op and helper gone")
    finally:
        if pid_alive(helper):  # the test's own leftover on failure, stopped by its pid
            os.kill(helper, signal.SIGKILL)
    reconcile_until(deployment, run_id, DagsterRunStatus.CANCELED)
    assert "SIGKILL" in deployment.worker_log(0)
    assert any("killed" in m for m in deployment.engine_messages(run_id))
