"""Scenario 6: cancel 1,000 pending runs in one call, and show that none of them ever starts.

Half NOT_STARTED, half STARTING with the task message already waiting in SQS (as our launcher
leaves them while no worker listens). QUEUED runs are left out: Dagster only queues runs with a
remote (code-server) origin, which a run created from a job definition does not have. After
``cancel_runs`` a worker is started: it must take every waiting message and skip it, running
nothing.
"""

from __future__ import annotations

import collections
import time

from dagster import DagsterEvent, DagsterEventType, RunsFilter
from dagster._core.utils import make_new_run_id

from benchmarks.cancel_latency import start_workers
from benchmarks.harness import Context
from benchmarks.stats import Row
from dagster_taskiq_cancel.bulk import cancel_runs
from dagster_taskiq_cancel.tasks import run_task_message
from dagster_taskiq_cancel_tests.jobs import sleepy_job
from dagster_taskiq_cancel_tests.stack import Deployment, wait_for

SCENARIO = "6 bulk cancel"


def create_pending(deployment: Deployment, count: int) -> list[str]:
    """``count`` runs, alternately NOT_STARTED and STARTING with the task message in SQS.

    Copies of one run record rather than ``count`` job snapshots, and the launcher's two effects
    (STARTING, the task message) without its per-run engine event, ten messages per request:
    the set-up is not what is measured, and on sqlite it would otherwise take minutes.
    """
    template = deployment.create_run(sleepy_job, seconds=600)
    runs = [template] + [
        deployment.instance.add_run(template._replace(run_id=make_new_run_id()))
        for _ in range(count - 1)
    ]
    starting = runs[1::2]
    for run in starting:
        event = DagsterEvent(DagsterEventType.RUN_STARTING.value, job_name=run.job_name)
        deployment.instance.report_dagster_event(event, run.run_id)
    messages = [run_task_message(run.run_id) for run in starting]
    failures = deployment.queues.send_batch(
        deployment.queues.names.main, [(m.body, m.task_id, m.task_id) for m in messages]
    )
    if failures:
        raise RuntimeError(f"could not queue the task messages: {failures[:3]}")
    return [run.run_id for run in runs]


def main_queue_empty(deployment: Deployment) -> bool:
    """The task messages are all taken (the cancel hints may still be draining)."""
    depth = deployment.queues.depths()[deployment.queues.names.main]
    return depth == {"visible": 0, "in_flight": 0}


def run(ctx: Context) -> list[Row]:
    deployment = Deployment(ctx.scratch("bulk"), ctx.endpoint_url)
    try:
        started = time.monotonic()
        run_ids = create_pending(deployment, ctx.size.bulk_runs)
        setup = time.monotonic() - started
        started = time.monotonic()
        result = cancel_runs(
            deployment.instance, run_ids=run_ids, reason="benchmark", requested_by="benchmarks"
        )
        elapsed = time.monotonic() - started
        started = time.monotonic()
        start_workers(deployment, 4, 4)  # competing consumers drain the queue sooner
        wait_for(lambda: main_queue_empty(deployment), 300, "every waiting task message taken")
        drained = time.monotonic() - started
        runs = deployment.instance.get_runs(RunsFilter(run_ids=run_ids))
        statuses = collections.Counter(run.status.value for run in runs)
        executed = sum(deployment.executions(run_id) for run_id in run_ids)
    finally:
        deployment.stop()
    if executed or not result.ok:
        raise AssertionError(f"{executed} runs executed; errors: {not result.ok}")
    return [
        Row(
            SCENARIO,
            f"cancel_runs, {len(run_ids)} pending runs [s]",
            [elapsed],
            note=f"actions {dict(result.by_action)}; statuses after {dict(statuses)}; "
            f"runs executed: {executed}; setup {setup:.0f} s",
        ),
        Row(SCENARIO, "worker skips the SQS-waiting ones [s]", [drained]),
    ]
