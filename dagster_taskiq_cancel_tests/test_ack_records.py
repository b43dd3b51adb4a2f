"""What the sensor writes for an ack: the request it answers and the steps the cancel interrupted.

In-process against a real sqlite instance: the run's log is written as Dagster and the launcher
write it (RUN_CANCELING with the audit line, STEP_FAILURE with Dagster's interrupt error), then
the sensor applies one ack.
"""

from __future__ import annotations

from collections.abc import Iterator

import dagster as dg
import pytest
from dagster import DagsterEvent, DagsterEventType
from dagster._core.events import StepFailureData
from dagster._core.execution.plan.handle import StepHandle
from dagster._utils.error import SerializableErrorInfo

from dagster_taskiq_cancel.cancel import audit_request_id, audit_text
from dagster_taskiq_cancel.messages import CancelAck, CancelRequest
from dagster_taskiq_cancel.sensor import TickSummary, _apply_ack
from dagster_taskiq_cancel_tests.jobs import sleepy_job

INTERRUPT = "DagsterExecutionInterruptedError"
CONFIG = {"ops": {"sleeper": {"config": {"marker_dir": "/nonexistent"}}}}


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as instance:
        yield instance


def _error(cls_name: str, cause: SerializableErrorInfo | None = None) -> SerializableErrorInfo:
    return SerializableErrorInfo(f"{cls_name} raised", [], cls_name, cause)


def _fail_step(
    instance: dg.DagsterInstance, run: dg.DagsterRun, step_key: str, error: SerializableErrorInfo
) -> None:
    event = DagsterEvent(
        DagsterEventType.STEP_FAILURE.value,
        job_name=run.job_name,
        step_handle=StepHandle.parse_from_key(step_key),
        event_specific_data=StepFailureData(error=error, user_failure_data=None),
    )
    instance.report_dagster_event(event, run.run_id)


def _ack_event(instance: dg.DagsterInstance, run_id: str) -> DagsterEvent:
    (event,) = [
        entry.dagster_event
        for entry in instance.all_logs(run_id)
        if entry.dagster_event and "acknowledged the cancel" in (entry.dagster_event.message or "")
    ]
    return event


def _metadata(event: DagsterEvent) -> dict[str, object]:
    return {k: v.value for k, v in event.engine_event_data.metadata.items()}


def test_the_audit_line_names_its_request() -> None:
    request = CancelRequest(run_id="r", reason="a reason; request x.", requested_by="me")
    assert audit_request_id(audit_text(request)) == request.request_id
    assert audit_request_id("Run canceled by someone else.") is None


def test_a_run_ack_names_the_request_and_the_steps_the_cancel_interrupted(
    instance: dg.DagsterInstance,
) -> None:
    """A worker that stopped the run on its poll sends no request id: the sensor takes it from
    the run's RUN_CANCELING. Only steps failed by Dagster's interrupt are named."""
    run = instance.create_run_for_job(sleepy_job, run_config=CONFIG)
    request = CancelRequest(run_id=run.run_id, reason="test", requested_by="me")
    instance.report_run_canceling(run, message=audit_text(request))
    _fail_step(instance, run, "sleeper", _error(INTERRUPT))
    _fail_step(instance, run, "wrapped", _error("DagsterUserCodeExecutionError", _error(INTERRUPT)))
    _fail_step(instance, run, "own_bug", _error("ValueError"))
    ack = CancelAck(run_id=run.run_id, task_id=run.run_id, worker_id="w", outcome="cancelled")

    _apply_ack(instance, run, ack, TickSummary())

    event = _ack_event(instance, run.run_id)
    assert "Steps it interrupted: sleeper, wrapped." in (event.message or "")
    metadata = _metadata(event)
    assert metadata["request_id"] == request.request_id
    assert metadata["interrupted_steps"] == "sleeper, wrapped"


def test_a_step_ack_keeps_its_own_request_and_names_no_other_steps(
    instance: dg.DagsterInstance,
) -> None:
    run = instance.create_run_for_job(sleepy_job, run_config=CONFIG)
    instance.report_run_canceling(run, message=audit_text(CancelRequest(run_id=run.run_id)))
    _fail_step(instance, run, "sleeper", _error(INTERRUPT))
    ack = CancelAck(
        run_id=run.run_id,
        step_key="sleeper",
        task_id=f"{run.run_id}:sleeper:0",
        worker_id="w",
        outcome="cancelled",
        request_id="from-the-hint",
    )

    _apply_ack(instance, run, ack, TickSummary())

    event = _ack_event(instance, run.run_id)
    assert "Steps it interrupted" not in (event.message or "")
    metadata = _metadata(event)
    assert metadata["request_id"] == "from-the-hint"
    assert "interrupted_steps" not in metadata
