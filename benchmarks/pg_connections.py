"""Scenario: Postgres connections opened per busy worker per minute, beside main before the fleet
work (``baseline.BEFORE_FLEET``).

Two deployments on one private cluster, a database each: a worker of today's package and one of
main's (its package first on the worker's path), each holding one run that sleeps through the
window. The count is the server's: the connections each database accepted (``log_connections``)
during one window, both workers busy at once. The run's own process sleeps in its op and opens
none then; it is in both counts alike.
"""

from __future__ import annotations

import contextlib
import os
import time

from dagster import DagsterRunStatus

from benchmarks.baseline import BEFORE_FLEET, tree
from benchmarks.harness import REPO, Context
from benchmarks.stats import Row
from dagster_taskiq_cancel.storage_pool import RECYCLE_SECONDS
from dagster_taskiq_cancel_tests.jobs import sleepy_job
from dagster_taskiq_cancel_tests.postgres import PostgresCluster, storage_config
from dagster_taskiq_cancel_tests.stack import Deployment

SCENARIO = "pg connections"
SETTLE_S = 5.0  # after the op started: the worker's start-up and admission calls are over


def run(ctx: Context) -> list[Row]:
    window = ctx.size.idle_window_s
    with contextlib.ExitStack() as stack:
        cluster = PostgresCluster(settings={"log_connections": "on"}).start()
        stack.callback(cluster.stop)  # last: after the workers stopped
        databases: dict[str, str] = {}
        held: list[tuple[Deployment, str]] = []
        for label, path in (("today", [REPO]), ("main", [tree(BEFORE_FLEET), REPO])):
            database = cluster.database()
            databases[label] = str(database["db_name"])
            deployment = stack.enter_context(
                Deployment(
                    ctx.scratch(f"pgconn-{label}"), ctx.endpoint_url, storage_config(database)
                )
            )
            deployment.env["PYTHONPATH"] = os.pathsep.join(str(p) for p in path)
            deployment.start_worker()
            run_id = deployment.launch(sleepy_job, seconds=window + 10 * SETTLE_S)
            deployment.op_pid(run_id)
            held.append((deployment, run_id))
        time.sleep(SETTLE_S)  # not a synchronisation: start-up's calls are not the figure
        before = {label: cluster.connections_opened(db) for label, db in databases.items()}
        time.sleep(window)  # the measurement itself: both workers busy for the window
        after = {label: cluster.connections_opened(db) for label, db in databases.items()}
        statuses = [deployment.status(run_id) for deployment, run_id in held]
        if set(statuses) != {DagsterRunStatus.STARTED}:
            raise AssertionError(f"a run ended during the window: {statuses}")
    per_minute = {label: (after[label] - before[label]) * 60 / window for label in after}
    return [
        Row(
            SCENARIO,
            "Postgres connections opened / busy worker / min",
            [per_minute["today"]],
            f"main {BEFORE_FLEET} (NullPool)",
            [per_minute["main"]],
            note=f"one {window:.0f} s window, both workers holding a sleeping run; counted by the "
            f"server (log_connections); today's steady state also renews its 2 kept connections "
            f"every {RECYCLE_SECONDS} s: {2 * 60 / RECYCLE_SECONDS:.1f} / min",
        )
    ]
