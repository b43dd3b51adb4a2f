"""The retry decision of a cancelled run, in-process against a real sqlite instance.

Each source of "this run is cancelled" (deadline file, run status, a cancel in the event log that
RUN_START overwrote) refuses the retry; a storage error refuses it too, and a run that is not
cancelled keeps Dagster's own decision.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.execution.context.system import StepExecutionContext
from dagster._core.test_utils import create_run_for_test, instance_for_test

from dagster_taskiq_cancel.cooperative import CANCEL_FILE_ENV, announce
from dagster_taskiq_cancel.worker import no_cancel_retry
from dagster_taskiq_cancel.worker.no_cancel_retry import run_cancelled
from dagster_taskiq_cancel_tests.retry_jobs import interrupted_job

STARTED = dg.DagsterRunStatus.STARTED


@pytest.fixture
def instance(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[dg.DagsterInstance]:
    monkeypatch.setenv(CANCEL_FILE_ENV, str(tmp_path / "task.deadline"))
    with instance_for_test() as instance:
        yield instance


def _started(instance: dg.DagsterInstance) -> dg.DagsterRun:
    return create_run_for_test(instance, job_name="job", status=STARTED)


def _storage_down(monkeypatch: pytest.MonkeyPatch, instance: dg.DagsterInstance) -> list[str]:
    calls: list[str] = []

    def fail(run_id: str) -> None:
        calls.append(run_id)
        raise OSError("database is gone")

    monkeypatch.setattr(instance, "get_run_by_id", fail)
    return calls


def test_a_running_run_keeps_dagsters_decision(instance: dg.DagsterInstance) -> None:
    assert not run_cancelled(instance, _started(instance).run_id)


def test_a_canceling_run_is_cancelled(instance: dg.DagsterInstance) -> None:
    run = _started(instance)
    instance.report_run_canceling(run)
    assert run_cancelled(instance, run.run_id)


def test_a_cancel_that_run_start_overwrote_still_counts(instance: dg.DagsterInstance) -> None:
    run = _started(instance)
    instance.report_run_canceling(run)
    start = dg.DagsterEvent(dg.DagsterEventType.RUN_START.value, job_name="job")
    instance.run_storage.handle_run_event(run.run_id, start)  # status only, as the race leaves it
    assert instance.get_run_by_id(run.run_id).status == STARTED  # type: ignore[union-attr]
    assert run_cancelled(instance, run.run_id)


def test_the_deadline_file_decides_without_the_storage(
    instance: dg.DagsterInstance, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    run = _started(instance)
    announce(tmp_path / "task.deadline", time.time() + 5)
    calls = _storage_down(monkeypatch, instance)
    assert run_cancelled(instance, run.run_id)
    assert not calls


def test_a_storage_error_refuses_the_retry(
    instance: dg.DagsterInstance, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    run = _started(instance)
    calls = _storage_down(monkeypatch, instance)
    with caplog.at_level(logging.WARNING):
        assert run_cancelled(instance, run.run_id)
    assert calls == [run.run_id]
    assert "cannot read whether it is cancelled, no retry" in caplog.text


@pytest.mark.parametrize("cancel", [True, False])
def test_an_interrupted_op_is_retried_only_outside_a_cancel(
    instance: dg.DagsterInstance, monkeypatch: pytest.MonkeyPatch, cancel: bool
) -> None:
    monkeypatch.setattr(StepExecutionContext, "retry_mode", StepExecutionContext.retry_mode)
    no_cancel_retry.install()  # undone by monkeypatch
    result = interrupted_job.execute_in_process(
        run_config={"ops": {"interrupted": {"config": {"cancel": cancel}}}},
        instance=instance,
        raise_on_error=False,
    )
    kinds = {event.event_type for event in result.all_events}
    assert (dg.DagsterEventType.STEP_UP_FOR_RETRY in kinds) is not cancel
    assert dg.DagsterEventType.STEP_FAILURE in kinds
