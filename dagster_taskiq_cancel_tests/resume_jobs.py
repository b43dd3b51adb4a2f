"""A two-step job for resume: ``prep`` finishes at once, ``work`` sleeps on its first execution.

``prep`` appends to ``{marker_dir}/{run_id}.prep`` each time it runs; ``work`` records itself as
the other test jobs' ops do and reads ``prep``'s output through the IO manager. (No ``from
__future__ import annotations``: Dagster reads the ops' annotations at definition time.)
"""

from pathlib import Path

import dagster as dg

from dagster_taskiq_cancel_tests.jobs import MarkerConfig, sleep_first_time

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


@dg.op
def work(context: dg.OpExecutionContext, config: MarkerConfig, prepared: int) -> None:
    sleep_first_time(context, config)
    if prepared != PREPARED:
        raise ValueError(f"prep's output read back as {prepared!r}")


@dg.job  # Dagster's default executor: each op in its own multiprocessing step process
def prep_work_job() -> None:
    work(prep())


def prep_work_config(marker_dir: Path, seconds: float) -> dict[str, object]:
    config = {"marker_dir": str(marker_dir), "seconds": seconds}
    return {"ops": {"prep": {"config": config}, "work": {"config": config}}}
