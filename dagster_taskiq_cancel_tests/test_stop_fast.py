"""Terminate ends a run CANCELED at once: a step process still starting is stopped, not waited
for, and a run the worker had to kill is recorded CANCELED without waiting for the sensor.

None of these tests runs the reconciliation sensor: every CANCELED is written by Dagster's run
process or by the worker itself.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from dagster import DagsterRunStatus

from dagster_taskiq_cancel.messages import CancelAck, Outcome, parse_message
from dagster_taskiq_cancel_tests.jobs import stubborn_job
from dagster_taskiq_cancel_tests.slow_jobs import slow_import_job
from dagster_taskiq_cancel_tests.stack import (
    MOTO_ONLY,
    Deployment,
    descendant_pids,
    pid_alive,
    wait_for,
)
from dagster_taskiq_cancel_tests.step_start_jobs import step_start_job
from dagster_taskiq_cancel_tests.test_true_outcomes import _exit_codes, _wait_run_process_started

pytestmark = MOTO_ONLY

Status = DagsterRunStatus
# Terminate → CANCELED when Dagster's interrupt stops the run by itself (issue 16).
PROMPT_SECONDS = 2.0
BOOT_HOOK = Path(__file__).with_name("step_boot")


def _run_ack(deployment: Deployment, run_id: str) -> CancelAck:
    """The ack of the run task (not of a step), read from the acks queue."""
    url = deployment.queues.url(deployment.queues.names.acks)
    found: list[CancelAck] = []

    def receive() -> bool:
        response = deployment.queues.call(
            "receive_message", QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1
        )
        for message in response.get("Messages", []):
            ack = parse_message(CancelAck, message["Body"])
            if ack.run_id == run_id and ack.step_key is None and ack.outcome != "not_running":
                found.append(ack)
        return bool(found)

    wait_for(receive, 30, f"the run task's ack for {run_id}")
    return found[0]


def _terminate_and_time(deployment: Deployment, run_id: str, timeout: float = 30) -> float:
    """Seconds from terminate() to CANCELED in the run storage."""
    started = time.monotonic()
    assert deployment.instance.run_launcher.terminate(run_id)
    deployment.wait_status(run_id, {Status.CANCELED}, timeout=timeout)
    return time.monotonic() - started


def _assert_all_gone(deployment: Deployment, outcome: Outcome, run_id: str) -> None:
    worker = deployment.workers[0].pid
    wait_for(lambda: not descendant_pids(worker), 30, "every process of the task gone")
    assert _run_ack(deployment, run_id).outcome == outcome


@pytest.mark.parametrize("phase", ["boot", "import"])
def test_terminate_while_a_step_process_starts_stops_it_at_once(
    deployment: Deployment, phase: str
) -> None:
    """The step process is held at interpreter start-up (``boot``: before it has any Dagster
    signal handling) or while it imports the job's module (``import``: Dagster defers the
    interrupt until the op begins). Neither is waited for: Dagster's run process ends the run
    CANCELED by itself, nothing is SIGKILLed, and the op never runs."""
    gate = deployment.root / "step-gate"
    gate.write_text("")
    if phase == "boot":
        path = os.pathsep.join(filter(None, [str(BOOT_HOOK), deployment.env.get("PYTHONPATH")]))
        deployment.env.update(PYTHONPATH=path, TEST_STEP_BOOT_GATE=str(gate))
    else:
        deployment.env["TEST_STEP_IMPORT_GATE"] = str(gate)
    try:
        deployment.start_worker()
        run_id = deployment.launch(step_start_job, seconds=60)
        entered = Path(f"{gate}.entered")
        step_pid = int(wait_for(lambda: entered.exists() and entered.read_text(), 120, "held"))
        deployment.wait_status(run_id, {Status.STARTED})
        elapsed = _terminate_and_time(deployment, run_id)
        wait_for(lambda: not pid_alive(step_pid), 10, "the step process gone")
        wait_for(lambda: _exit_codes(deployment) == ["0"], 30, "the run process exited by itself")
        _assert_all_gone(deployment, "cancelled", run_id)
    finally:
        gate.unlink(missing_ok=True)
    print(f"terminate -> CANCELED, step process held at {phase}: {elapsed:.2f}s")
    assert "SIGKILL" not in deployment.worker_log(0)
    assert deployment.executions(run_id) == 0
    assert elapsed <= PROMPT_SECONDS, f"{elapsed:.2f}s"


def test_a_run_killed_after_grace_is_canceled_at_once(deployment: Deployment) -> None:
    """The op ignores the interrupt: SIGKILL after the grace, and the worker records CANCELED
    right away, with an event that says so."""
    grace = 1.0
    deployment.start_worker("--grace-seconds", str(grace))
    run_id = deployment.launch(stubborn_job, seconds=300)
    pid = deployment.op_pid(run_id)
    deployment.wait_status(run_id, {Status.STARTED})
    elapsed = _terminate_and_time(deployment, run_id)
    print(f"terminate -> CANCELED, op ignoring SIGTERM, grace {grace}s: {elapsed:.2f}s")
    assert not pid_alive(pid)
    _assert_all_gone(deployment, "killed", run_id)
    assert any("SIGKILL" in m and "CANCELED" in m for m in deployment.engine_messages(run_id))
    assert elapsed <= grace + 1, f"{elapsed:.2f}s"


def test_a_run_killed_before_dagster_started_it_is_canceled_at_once(
    deployment: Deployment,
) -> None:
    """A cancel while Dagster's run process imports the job (before RUN_START) kills it; the
    worker then records CANCELED itself."""
    deployment.env["TEST_SLOW_IMPORT_SECONDS"] = "30"
    deployment.start_worker()
    run_id = deployment.launch(slow_import_job, seconds=60)
    _wait_run_process_started(deployment, run_id)
    elapsed = _terminate_and_time(deployment, run_id)
    print(f"terminate -> CANCELED, run process starting: {elapsed:.2f}s")
    _assert_all_gone(deployment, "killed", run_id)
    assert deployment.executions(run_id) == 0
    assert any("none of it ran" in m for m in deployment.engine_messages(run_id))
    assert elapsed <= PROMPT_SECONDS, f"{elapsed:.2f}s"
