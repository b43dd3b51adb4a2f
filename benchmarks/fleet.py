"""Scenario 7: what a fleet of busy workers costs the run storage and SQS, against its size.

For each size (``Size.fleet_workers``: 10, 100, then as many as this machine allows) and each
version (today's package and main before the fleet work, ``baseline.BEFORE_FLEET``), a fresh
Postgres database gets one STARTED run per worker, and a few ``benchmarks.fleet_sim`` processes
run the workers (real ``Worker`` objects, many per event loop) against it and the local SQS
server. Over one window, with every worker up: Postgres sessions opened
(``pg_stat_database.sessions``), the server's CPU time (its processes in /proc, exited
backends included through the postmaster's reaped-children time), and what the simulated
workers counted (storage calls, SQL statements, SQS requests, the poll's time on its thread).
Every figure is per worker.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import math
import os
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import psycopg2
import yaml
from dagster import DagsterEvent, DagsterEventType, DagsterInstance
from dagster._core.utils import make_new_run_id

from benchmarks.baseline import BEFORE_FLEET, run_with
from benchmarks.fleet_sim import ABORT
from benchmarks.harness import Context
from benchmarks.stats import Row, percentile
from dagster_taskiq_cancel import claims
from dagster_taskiq_cancel.cancel import WRITERS, pooled_instance
from dagster_taskiq_cancel_tests.jobs import sleepy_job
from dagster_taskiq_cancel_tests.postgres import (
    PASSWORD,
    SERVER_USER,
    PostgresCluster,
    storage_config,
)
from dagster_taskiq_cancel_tests.stack import Deployment, wait_for

SCENARIO = "7 fleet"
WORKERS_PER_PROCESS = 75  # several Worker objects share one event loop in each sim process
LOOPS_AFTER_S = 1.0  # from every sim process set up to its workers' loops starting
WARM_UP_S = 2.0  # from every worker's first beat to the window
VERSIONS: Mapping[str, str | None] = {"today": None, BEFORE_FLEET: BEFORE_FLEET}
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def run(ctx: Context) -> list[Row]:
    sizes = ctx.size.fleet_workers
    # Pooled workers keep a few connections each: room for all of them, and the bench's own.
    room = {"max_connections": str(4 * max(sizes) + 50)}
    cluster = PostgresCluster(durable=True, settings=room).start()
    try:
        figures = {
            (workers, label): measure(ctx, cluster, workers, commit)
            for workers in sizes
            for label, commit in VERSIONS.items()
        }
    finally:
        cluster.stop()
    return rows(figures, sizes, ctx.size.fleet_window_s)


# --- one fleet -----------------------------------------------------------------------------------


def measure(
    ctx: Context, cluster: PostgresCluster, workers: int, commit: str | None
) -> dict[str, Any]:
    """Run ``workers`` simulated busy workers of ``commit``'s package over one window."""
    label = commit or "today"
    root = ctx.scratch(f"fleet-{workers}-{label}")
    database = cluster.database()
    deployment = Deployment(root, ctx.endpoint_url, storage_config(database))
    try:
        own_defaults(deployment)
        run_ids = started_runs(deployment, workers)
        processes = math.ceil(workers / WORKERS_PER_PROCESS)
        sync = root / "sync"
        sync.mkdir()
        batches = [run_ids[i::processes] for i in range(processes)]
        with concurrent.futures.ThreadPoolExecutor(processes) as pool:
            sims = []
            for index, batch in enumerate(batches):
                runs = root / f"runs-{index}"
                runs.write_text("\n".join(batch))
                args = (str(deployment.home), str(runs), str(sync), "--name", str(index))
                sims.append(pool.submit(simulate, commit, *args))
            try:
                server = window(ctx, cluster, database["db_name"], sync, sims)
            except BaseException:
                for order in ("loops", "go"):  # the others end now
                    if not (sync / order).exists():
                        (sync / order).write_text(ABORT)
                raise
            outputs = [sim.result() for sim in sims]
    finally:
        deployment.stop()
    figures = combine(outputs, server, workers)
    print(f"fleet {workers} {label}: {json.dumps({**figures, 'poll_ms': len(figures['poll_ms'])})}")
    return figures


def simulate(commit: str | None, *args: str) -> dict[str, Any]:
    """One ``fleet_sim`` process of ``commit``'s package; its JSON, or its error output."""
    try:
        done = run_with(commit, "benchmarks.fleet_sim", *args)
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"fleet_sim {args} failed:\n{exc.stderr[-3000:]}") from None
    return json.loads(done.stdout)


def own_defaults(deployment: Deployment) -> None:
    """Leave only the queue and the endpoint in the launcher's config, so that each version's
    workers run with that version's defaults (poll interval, heartbeat): today's settings,
    written out whole, would impose today's values on 94b9a24, or fields it does not know."""
    path = deployment.home / "dagster.yaml"
    config = yaml.safe_load(path.read_text())
    settings = deployment.settings
    config["run_launcher"]["config"] = {
        "queue_name": settings.queue_name,
        "endpoint_url": settings.endpoint_url,
    }
    path.write_text(yaml.safe_dump(config))


def started_runs(deployment: Deployment, count: int) -> list[str]:
    """``count`` STARTED runs, each sent as its own run task (copies of one run record)."""
    template = deployment.create_run(sleepy_job, seconds=600)

    def add(instance: DagsterInstance, index: int) -> str:
        run = (
            template
            if index == 0
            else instance.add_run(template._replace(run_id=make_new_run_id()))
        )
        event = DagsterEvent(DagsterEventType.RUN_START.value, job_name=run.job_name)
        instance.report_dagster_event(event, run.run_id)
        claims.record_sent(instance, run.run_id, run.run_id)
        return run.run_id

    with (
        pooled_instance(deployment.instance) as instance,
        concurrent.futures.ThreadPoolExecutor(WRITERS) as pool,
    ):
        return list(pool.map(functools.partial(add, instance), range(count)))


def window(
    ctx: Context,
    cluster: PostgresCluster,
    db_name: str,
    sync: Path,
    sims: list[concurrent.futures.Future[Any]],
) -> dict[str, float]:
    """Open the window once every sim process is ready; the server's figures over it."""

    def every(stage: str) -> Callable[[], bool]:
        def reached() -> bool:
            failed = [sim for sim in sims if sim.done()]
            if failed:
                failed[0].result()  # raises the sim's error (its stderr is in the exception)
                raise RuntimeError("a fleet sim process ended before the window")
            return len(list(sync.glob(f"{stage}-*"))) == len(sims)

        return reached

    wait_for(every("set-up"), 900, "every fleet sim process set up", interval=0.5)
    (sync / "loops").write_text(str(time.time() + LOOPS_AFTER_S))
    wait_for(every("ready"), 900, "every simulated worker beating", interval=0.5)
    seconds = ctx.size.fleet_window_s
    start = time.time() + WARM_UP_S
    (sync / "go").write_text(json.dumps({"start": start, "seconds": seconds}))
    stats = psycopg2.connect(
        host="127.0.0.1", port=cluster.port, user=SERVER_USER, password=PASSWORD, dbname=db_name
    )
    stats.autocommit = True
    try:
        time.sleep(max(0.0, start - time.time()))  # the window is timed: sleeping is the point
        first = server_counts(stats, cluster)
        time.sleep(max(0.0, start + seconds - time.time()))
        last = server_counts(stats, cluster)
    finally:
        stats.close()
    return {key: last[key] - first[key] for key in first}


def server_counts(stats: Any, cluster: PostgresCluster) -> dict[str, float]:
    """Sessions opened on the database so far, and the server's CPU milliseconds so far."""
    with stats.cursor() as cursor:
        cursor.execute("SELECT sessions FROM pg_stat_database WHERE datname = current_database()")
        (sessions,) = cursor.fetchone()
    assert cluster.process is not None
    return {"sessions": float(sessions), "cpu_ms": server_cpu_ms(cluster.process.pid)}


def server_cpu_ms(postmaster: int) -> float:
    """CPU time of the postmaster, of the backends it reaped, and of those alive now."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile: its time is in the postmaster's reaped-children time
        pid, ppid = int(entry.name), int(fields[1])
        if pid == postmaster:
            total += sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
        elif ppid == postmaster:
            total += int(fields[11]) + int(fields[12])
    return total * 1000 / _CLK_TCK


def combine(
    outputs: list[dict[str, Any]], server: dict[str, float], workers: int
) -> dict[str, Any]:
    """Per-worker figures of one fleet from its sim processes' counts and the server's."""
    seconds = outputs[0]["seconds"]
    per_worker_s = seconds * workers
    calls = sum(sum(o["calls"].values()) for o in outputs)
    sqs = sum(sum(o["sqs"].values()) for o in outputs)
    return {
        "connections_per_s": server["sessions"] / per_worker_s,
        "storage_calls_per_s": calls / per_worker_s,
        "statements_per_s": sum(o["statements"] for o in outputs) / per_worker_s,
        "pg_cpu_ms_per_s": server["cpu_ms"] / per_worker_s,
        "sqs_per_min": sqs * 60 / per_worker_s,
        "poll_ms": [ms for o in outputs for ms in o["poll_ms"]],
        "problems": sum(o["problems"] for o in outputs),
        "problem_kinds": [kind for o in outputs for kind in o["problem_kinds"]][:3],
        "dead_loops": [d for o in outputs for d in o["dead_loops"]][:3],
        "setup_s": max(o["setup_s"] for o in outputs),
        "sqs_by_operation": _summed([o["sqs"] for o in outputs]),
    }


def _summed(counts: list[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for count in counts:
        for key, value in count.items():
            total[key] = total.get(key, 0) + value
    return total


# --- the table -----------------------------------------------------------------------------------

METRICS = {
    "connections_per_s": "Postgres connections opened / worker / s",
    "storage_calls_per_s": "storage calls / worker / s",
    "statements_per_s": "SQL statements / worker / s",
    "pg_cpu_ms_per_s": "Postgres CPU ms / worker / s",
    "sqs_per_min": "SQS requests / worker / min",
}


def rows(
    figures: dict[tuple[int, str], dict[str, Any]], sizes: tuple[int, ...], seconds: float
) -> list[Row]:
    out = []
    for workers in sizes:
        today, before = figures[(workers, "today")], figures[(workers, BEFORE_FLEET)]
        for key, metric in METRICS.items():
            out.append(
                Row(
                    SCENARIO,
                    f"{metric}, {workers} workers",
                    [today[key]],
                    BEFORE_FLEET,
                    [before[key]],
                )
            )
        before_p99 = percentile(before["poll_ms"], 99) if before["poll_ms"] else float("nan")
        note = (
            f"{workers} workers, {seconds:.0f} s window; {BEFORE_FLEET} p99 {before_p99:.1f} ms; "
            f"worker warnings (non-zero: the machine could not carry this fleet, its figures "
            f"are low) today {today['problems']} {today['problem_kinds'][:1]}, {BEFORE_FLEET} "
            f"{before['problems']} {before['problem_kinds'][:1]}; SQS today "
            f"{today['sqs_by_operation']}"
        )
        out.append(
            Row(
                SCENARIO,
                f"poll storage call [ms], {workers} workers",
                today["poll_ms"],
                BEFORE_FLEET,
                before["poll_ms"],
                note=note,
            )
        )
    return out
