"""Jobs whose op has a RetryPolicy, on each executor: a cancel of them must never be a retry.

(No ``from __future__ import annotations``: Dagster reads the ops' annotations at definition
time.)
"""

import dagster as dg

from dagster_taskiq_cancel import taskiq_executor
from dagster_taskiq_cancel_tests.jobs import sleeper

RETRIED = dg.RetryPolicy(max_retries=3)


@dg.job  # Dagster's default executor: the op runs in a multiprocessing step process
def retried_multiprocess_job() -> None:
    sleeper.with_retry_policy(RETRIED)()


@dg.job(executor_def=taskiq_executor)  # the op runs in an execute_step child of a worker
def retried_step_job() -> None:
    sleeper.with_retry_policy(RETRIED)()


@dg.op(retry_policy=RETRIED)
def interrupted(context: dg.OpExecutionContext) -> None:
    """Interrupted at once, its run cancelled first when its config says so (in-process tests)."""
    if context.op_config["cancel"]:
        run = context.instance.get_run_by_id(context.run_id)
        context.instance.report_run_canceling(run)  # type: ignore[arg-type]
    raise dg.DagsterExecutionInterruptedError()


@dg.job(executor_def=dg.in_process_executor)
def interrupted_job() -> None:
    interrupted()
