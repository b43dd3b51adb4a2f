"""One wide run's steps, launched and admitted in process: the measuring half of ``wide``.

``python -m benchmarks.wide_run DAGSTER_HOME ENDPOINT_URL STEPS INDEX...`` makes one STARTED run
of ``wide_job`` (a fan-out to STEPS mapped steps) in the instance at DAGSTER_HOME, then, step
after step, does what a run of that width does to the run storage: the run process's real step
handler launches the step (``TaskiqStepHandler.launch_step``, with the known state Dagster's
executor gives it), a worker's real admission admits it (``Gate.admit``, timed), and the step's
own events follow (start, output, success). It prints one JSON line: admission seconds (wall
clock, CPU) by step index, for each INDEX (and the steps after it, ``SAMPLES`` in all).

Run by ``benchmarks.wide`` once with today's package and once with an earlier one
(``baseline.run_with``): it calls only what both have.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
from dagster import DagsterEvent, DagsterEventType, DagsterInstance
from dagster._core.events import StepOutputData
from dagster._core.execution.api import create_execution_plan
from dagster._core.execution.context_creation_job import (
    PlanOrchestrationContextManager,
    orchestration_context_event_generator,
)
from dagster._core.execution.plan.handle import ResolvedFromDynamicStepHandle, StepHandle
from dagster._core.execution.plan.objects import StepSuccessData
from dagster._core.execution.plan.outputs import StepOutputHandle
from dagster._core.execution.plan.state import KnownExecutionState
from dagster._core.execution.retries import RetryMode
from dagster._core.executor.step_delegating import StepHandlerContext
from dagster._grpc.types import ExecuteStepArgs

from dagster_taskiq_cancel.queues import SyncQueues
from dagster_taskiq_cancel.settings import TaskiqCancelSettings
from dagster_taskiq_cancel.step_handler import TaskiqStepHandler
from dagster_taskiq_cancel.tasks import step_task_id
from dagster_taskiq_cancel.worker.admission import Admitted, Gate

SAMPLES = 5  # admissions timed from each index on: the median of them is the figure
FAN = "fan_out"


@dg.op(out=dg.DynamicOut(int))
def fan_out() -> Iterator[dg.DynamicOutput[int]]:
    yield dg.DynamicOutput(0, mapping_key="0")


@dg.op
def part(value: int) -> int:
    return value


@dg.job
def wide_job() -> None:
    fan_out().map(part)


def _step_event(event_type: DagsterEventType, step_key: str, data: object = None) -> DagsterEvent:
    handle = StepHandle.parse_from_key(step_key)
    assert isinstance(handle, (StepHandle, ResolvedFromDynamicStepHandle))
    return DagsterEvent(
        event_type.value, job_name=wide_job.name, step_handle=handle, event_specific_data=data
    )


class WideRun:
    """One STARTED run of ``wide_job``, its fan-out step done with ``steps`` outputs, and its
    run process's step handler, launching the mapped steps with the state Dagster's executor
    gives each (a context manager: the run's orchestration context is open inside)."""

    def __init__(self, instance: DagsterInstance, settings: TaskiqCancelSettings, steps: int):
        self.instance = instance
        self.handler = TaskiqStepHandler(settings)
        self.recon = dg.reconstructable(wide_job)
        mappings = {FAN: {"result": [str(i) for i in range(steps)]}}
        self.plan = create_execution_plan(
            self.recon, {}, known_state=KnownExecutionState(dynamic_mappings=mappings)
        )
        self.state = KnownExecutionState(dynamic_mappings=mappings, ready_outputs=set())
        self.run = instance.create_run_for_job(
            job_def=wide_job, job_code_origin=self.recon.get_python_origin()
        )
        self._manager = PlanOrchestrationContextManager(
            orchestration_context_event_generator, self.recon, self.plan, {}, self.run, instance
        )

    def __enter__(self) -> WideRun:
        start = DagsterEvent(DagsterEventType.RUN_START.value, job_name=self.run.job_name)
        self.instance.report_dagster_event(start, self.run.run_id)
        steps = len(self.state.dynamic_mappings[FAN]["result"] or [])
        self.finish([StepOutputHandle(FAN, "result", str(i)) for i in range(steps)])
        list(self._manager.prepare_context())
        return self

    def __exit__(self, *exc_info: object) -> None:
        list(self._manager.shutdown_context())

    def launch(self, index: int, attempt: int = 0) -> str:
        """Launch ``part[index]`` (its ``attempt``) as the executor does; its task id."""
        step_key = f"part[{index}]"
        state = self.state._replace(previous_retry_attempts={step_key: attempt} if attempt else {})
        args = ExecuteStepArgs(
            job_origin=self.recon.get_python_origin(),
            run_id=self.run.run_id,
            step_keys_to_execute=[step_key],
            instance_ref=self.instance.get_ref(),
            retry_mode=RetryMode.DEFERRED,
            known_state=state,
            should_verify_step=True,
        )
        step = self.plan.get_step_by_key(step_key)
        plan_context = self._manager.get_context()
        context = StepHandlerContext(self.instance, plan_context, [step], args, self.run)
        list(self.handler.launch_step(context))
        return step_task_id(self.run.run_id, step_key, attempt)

    def finish(self, outputs: list[StepOutputHandle]) -> None:
        """The events a step process writes for a step that succeeds with ``outputs``; the
        executor's state then lists them as ready."""
        key = outputs[0].step_key
        run_id = self.run.run_id
        self.instance.report_dagster_event(_step_event(DagsterEventType.STEP_START, key), run_id)
        for output in outputs:
            event = _step_event(DagsterEventType.STEP_OUTPUT, key, StepOutputData(output))
            self.instance.report_dagster_event(event, run_id)
        success = _step_event(DagsterEventType.STEP_SUCCESS, key, StepSuccessData(0.01))
        self.instance.report_dagster_event(success, run_id)
        self.state = self.state._replace(ready_outputs=self.state.ready_outputs | set(outputs))


def measure(
    home: Path, endpoint_url: str, steps: int, indexes: list[int]
) -> dict[int, tuple[float, float]]:
    """Admission seconds of each timed step index, wall clock and this process's CPU (which a
    busy machine's scheduling does not inflate)."""
    timed = {i + k for i in indexes for k in range(SAMPLES)}
    last = max(timed) + 1
    if last > steps:
        raise ValueError(f"index {max(timed)} is beyond the run's {steps} steps")
    settings = TaskiqCancelSettings(
        queue_name=f"wide-{uuid.uuid4().hex[:8]}", endpoint_url=endpoint_url
    )
    SyncQueues(settings).create_all()
    seconds: dict[int, tuple[float, float]] = {}
    with (
        DagsterInstance.from_config(str(home)) as instance,
        tempfile.TemporaryDirectory() as tmp,
        WideRun(instance, settings, steps) as wide,
    ):
        gate = Gate(instance, "wide-worker", Path(tmp))
        for index in range(last):
            task_id = wide.launch(index)
            started, cpu = time.perf_counter(), time.process_time()
            admitted = gate.admit(task_id, wide.run.run_id, f"part[{index}]", 0, False)
            elapsed = (time.perf_counter() - started, time.process_time() - cpu)
            if not isinstance(admitted, Admitted):
                raise AssertionError(f"step {index} not admitted: {admitted}")
            if index in timed:
                seconds[index] = elapsed
            wide.finish([StepOutputHandle(f"part[{index}]", "result", None)])
    return seconds


def main(argv: list[str]) -> None:
    home, endpoint_url, steps, *indexes = argv
    seconds = measure(Path(home), endpoint_url, int(steps), [int(i) for i in indexes])
    print(json.dumps({str(i): s for i, s in sorted(seconds.items())}))


if __name__ == "__main__":
    main(sys.argv[1:])
