"""A code location for the re-execution tests: ``second`` fails in a run without a parent and
succeeds in its re-executions and retries; each op notes every execution of it.

(No ``from __future__ import annotations``: Dagster reads the ops' annotations.)
"""

from pathlib import Path

import dagster as dg


class Markers(dg.Config):
    marker_dir: str


def note(context: dg.OpExecutionContext, config: Markers) -> None:
    with (Path(config.marker_dir) / "executions").open("a") as f:
        f.write(f"{context.run_id} {context.op.name}\n")


@dg.op
def first(context: dg.OpExecutionContext, config: Markers) -> int:
    note(context, config)
    return 1


@dg.op
def second(context: dg.OpExecutionContext, config: Markers, value: int) -> int:
    note(context, config)
    if context.run.parent_run_id is None:
        raise RuntimeError("the first run of this job fails on purpose")
    return value + 1


@dg.job(executor_def=dg.in_process_executor)
def flaky_job() -> None:
    second(first())


defs = dg.Definitions(jobs=[flaky_job])
