"""Jobs routed to pools: a job tagged `gpu`, a `cpu` run whose one step is tagged `gpu`, and a
job whose op names a pool that has no queue.

(No ``from __future__ import annotations``: Dagster reads the ops' annotations at definition
time.)
"""

import dagster as dg

from dagster_taskiq_cancel import taskiq_executor
from dagster_taskiq_cancel.tasks import QUEUE_TAG
from dagster_taskiq_cancel_tests.jobs import sleeper
from dagster_taskiq_cancel_tests.step_jobs import STEP_RESOURCES, StepMarkers


@dg.job(tags={QUEUE_TAG: "gpu"})
def gpu_job() -> None:
    sleeper()


@dg.op(tags={QUEUE_TAG: "nosuch"})
def on_a_missing_pool() -> None:
    pass


@dg.job
def job_with_an_op_on_a_missing_pool() -> None:
    on_a_missing_pool()


@dg.op(tags={QUEUE_TAG: "gpu"})
def on_gpu(context: dg.OpExecutionContext, markers: StepMarkers) -> None:
    markers.record(context)
    markers.work(markers.seconds)


@dg.job(executor_def=taskiq_executor, resource_defs=STEP_RESOURCES, tags={QUEUE_TAG: "cpu"})
def cpu_job_with_a_gpu_step() -> None:
    on_gpu()
