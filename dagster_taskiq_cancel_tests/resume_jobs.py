"""Two-step jobs for resume: ``prep`` finishes at once, ``work`` waits on its first execution.

``prep`` appends to ``{marker_dir}/{run_id}.prep`` each time it runs; ``work`` records itself as
the other test jobs' ops do and reads ``prep``'s output through the IO manager. (No ``from
__future__ import annotations``: Dagster reads the ops' annotations at definition time.)
"""

from pathlib import Path

import dagster as dg

from dagster_taskiq_cancel import taskiq_executor
from dagster_taskiq_cancel_tests.jobs import MarkerConfig, sleep_first_time
from dagster_taskiq_cancel_tests.step_jobs import (
    STEP_RESOURCES,
    StepMarkers,
    fan_out,
    part,
    step_records,
)

PREPARED = 41


def prep_executions(marker_dir: Path, run_id: str) -> int:
    marker = marker_dir / f"{run_id}.prep"
    return len(marker.read_text().splitlines()) if marker.exists() else 0


@dg.op
def prep(context: dg.OpExecutionContext, config: MarkerConfig) -> int:
    directory = Path(config.marker_dir)
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / f"{context.run_id}.prep").open("a") as f:
        f.write("ran\n")
    return PREPARED


def go_file(marker_dir: Path, run_id: str) -> Path:
    """Once it exists, the first execution of ``work`` ends."""
    return marker_dir / f"{run_id}.go"


@dg.op
def work(context: dg.OpExecutionContext, config: MarkerConfig, prepared: int) -> None:
    sleep_first_time(context, config, until=go_file(Path(config.marker_dir), context.run_id))
    if prepared != PREPARED:
        raise ValueError(f"prep's output read back as {prepared!r}")


@dg.job  # Dagster's default executor: each op in its own multiprocessing step process
def prep_work_job() -> None:
    work(prep())


@dg.job(executor_def=taskiq_executor)  # each op a step task on a worker
def prep_work_step_job() -> None:
    work(prep())


def prep_work_config(marker_dir: Path, seconds: float) -> dict[str, object]:
    config = {"marker_dir": str(marker_dir), "seconds": seconds}
    return {"ops": {"prep": {"config": config}, "work": {"config": config}}}


@dg.op
def total_once(context: dg.OpExecutionContext, markers: StepMarkers, parts: list[int]) -> int:
    """Interrupted on its run's first execution, as a step is when its run is handed on."""
    markers.record(context)
    runs = [
        r
        for r in step_records(Path(markers.marker_dir), context.run_id)
        if r.step_key == "total_once"
    ]
    if len(runs) == 1:
        raise dg.DagsterExecutionInterruptedError()
    return sum(parts)


@dg.job(resource_defs=STEP_RESOURCES)  # the multiprocess executor, with a dynamic fan-out
def fan_resume_job() -> None:
    total_once(fan_out().map(part).collect())


@dg.job(  # the in-process executor, its outputs in memory: nothing a resume can read back
    executor_def=dg.in_process_executor,
    resource_defs={**STEP_RESOURCES, "io_manager": dg.mem_io_manager},
)
def fan_resume_in_memory_job() -> None:
    total_once(fan_out().map(part).collect())
