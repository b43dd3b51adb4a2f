"""A resumed run replays its event log under the multiprocess and in-process executors: its
finished steps, dynamic ones included, are not run again (in-process: the run process here,
real step processes, a real sqlite instance).

The first execution ends with ``total_once`` failed by an interrupt, as a step of a run handed
on by a stopping worker is; the run is then resumed as ``dagster api resume_run`` does.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.execution.api import execute_run_iterator
from dagster._core.execution.plan import active
from dagster._core.executor import multiprocess
from dagster._core.executor.in_process import InProcessExecutor
from dagster._core.test_utils import instance_for_test

from dagster_taskiq_cancel.worker import resumed_steps
from dagster_taskiq_cancel_tests.resume_jobs import fan_resume_in_memory_job, fan_resume_job
from dagster_taskiq_cancel_tests.step_jobs import fan_run_config, step_records


@pytest.fixture
def instance(monkeypatch: pytest.MonkeyPatch) -> Iterator[dg.DagsterInstance]:
    for executor in (multiprocess.MultiprocessExecutor, InProcessExecutor):
        monkeypatch.setattr(executor, "execute", executor.execute)
    for module in (multiprocess, active):
        monkeypatch.setattr(module, "ActiveExecution", module.ActiveExecution)
    resumed_steps.install()  # undone by monkeypatch
    with instance_for_test() as instance:
        yield instance


def _fail_then_resume(
    instance: dg.DagsterInstance, job_def: dg.JobDefinition, config: dict[str, object]
) -> str:
    """Run the job (``total_once`` interrupted), mark it STARTED as a handed-on run is, resume
    it as ``dagster api resume_run`` does; its id once it succeeded."""
    job = dg.reconstructable(job_def)
    first = dg.execute_job(job, instance, run_config=config)
    assert not first.success
    start = dg.DagsterEvent(dg.DagsterEventType.RUN_START.value, job_name=job_def.name)
    instance.run_storage.handle_run_event(first.run_id, start)
    run = instance.get_run_by_id(first.run_id)
    assert run is not None
    list(execute_run_iterator(job, run, instance, resume_from_failure=True))
    resumed = instance.get_run_by_id(first.run_id)
    assert resumed is not None and resumed.status == dg.DagsterRunStatus.SUCCESS
    return first.run_id


# Step processes fork from a server that has Dagster imported: seconds, not tens of seconds.
FORKSERVER = {"start_method": {"forkserver": {"preload_modules": [__name__]}}}


@pytest.mark.parametrize("executor", [{"multiprocess": FORKSERVER}, {"in_process": {}}])
def test_a_resume_runs_only_the_unfinished_steps_of_a_fan_out(
    instance: dg.DagsterInstance, tmp_path: Path, executor: dict[str, object]
) -> None:
    config = {**fan_run_config(tmp_path, width=2), "execution": {"config": executor}}
    run_id = _fail_then_resume(instance, fan_resume_job, config)
    ran = Counter(r.step_key for r in step_records(tmp_path / "markers", run_id))
    assert ran == {"fan_out": 1, "part[0]": 1, "part[1]": 1, "total_once": 2}
    messages = [e.dagster_event.message or "" for e in instance.all_logs(run_id) if e.dagster_event]
    assert any(
        "finished steps are not run again (fan_out, part[0], part[1])" in m for m in messages
    )


def test_a_resume_with_outputs_in_memory_runs_every_step_again(
    instance: dg.DagsterInstance, tmp_path: Path
) -> None:
    markers = {"marker_dir": str(tmp_path / "markers"), "width": 2}
    config = {"resources": {"markers": {"config": markers}}}
    run_id = _fail_then_resume(instance, fan_resume_in_memory_job, config)
    ran = Counter(r.step_key for r in step_records(tmp_path / "markers", run_id))
    assert ran == {"fan_out": 2, "part[0]": 2, "part[1]": 2, "total_once": 2}
