"""Scenario 6: cancel 1,000 pending runs in one call, and show that none of them ever starts.

Half NOT_STARTED, half STARTING with the task message already waiting in SQS (as our launcher
leaves them while no worker listens). QUEUED runs are left out: Dagster only queues runs with a
remote (code-server) origin, which a run created from a job definition does not have. After
``cancel_runs`` a worker is started: it must take every waiting message and skip it, running
nothing. ``--storage sqlite postgres`` picks the run storages (Postgres: a private cluster of
Debian's server binaries, as in the tests).
"""

from __future__ import annotations

import collections
import time
from typing import Any

from dagster import RunsFilter

from benchmarks.cancel_latency import start_workers
from benchmarks.harness import Context
from benchmarks.stats import Row
from dagster_taskiq_cancel.bulk import cancel_runs
from dagster_taskiq_cancel_tests.jobs import sleepy_job
from dagster_taskiq_cancel_tests.postgres import PostgresCluster, storage_config
from dagster_taskiq_cancel_tests.stack import (
    Deployment,
    create_pending_runs,
    main_queue_empty,
    wait_for,
)

SCENARIO = "6 bulk cancel"


def run(ctx: Context) -> list[Row]:
    rows: list[Row] = []
    for storage in ctx.storages:
        if storage == "postgres":
            cluster = PostgresCluster(durable=True).start()  # commits wait for the disk
            try:
                rows += measure(ctx, storage, storage_config(cluster.database()))
            finally:
                cluster.stop()
        else:
            rows += measure(ctx, storage, {})
    return rows


def measure(ctx: Context, storage: str, instance_config: dict[str, Any]) -> list[Row]:
    with Deployment(
        ctx.scratch(f"bulk-{storage}"), ctx.endpoint_url, instance_config
    ) as deployment:
        started = time.monotonic()
        run_ids = create_pending_runs(deployment, sleepy_job, ctx.size.bulk_runs)
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
    if executed or not result.ok:
        raise AssertionError(f"{executed} runs executed; errors: {not result.ok}")
    return [
        Row(
            SCENARIO,
            f"cancel_runs, {len(run_ids)} pending runs, {storage} [s]",
            [elapsed],
            note=f"{len(run_ids) / elapsed:.0f} runs/s; actions {dict(result.by_action)}; "
            f"statuses after {dict(statuses)}; runs executed: {executed}; setup {setup:.0f} s",
        ),
        Row(SCENARIO, f"worker skips the SQS-waiting ones, {storage} [s]", [drained]),
    ]
