"""A job whose one step is in a Dagster concurrency pool, sent to the workers by taskiq_executor.

(No ``from __future__ import annotations``: Dagster reads the ops' annotations at definition
time.)
"""

import time

import dagster as dg

from dagster_taskiq_cancel import taskiq_executor
from dagster_taskiq_cancel_tests.jobs import MarkerConfig, _record_start

POOL = "db"


@dg.op(pool=POOL)
def pooled(context: dg.OpExecutionContext, config: MarkerConfig) -> None:
    """Records its start, then sleeps in short slices so that Dagster's interrupt lands."""
    _record_start(context, config.marker_dir)
    deadline = time.monotonic() + config.seconds
    while time.monotonic() < deadline:
        time.sleep(0.05)


@dg.job(executor_def=taskiq_executor)
def pooled_job() -> None:
    pooled()
