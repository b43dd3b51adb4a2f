"""Scenario 5: how cancel latency grows with worker processes, and what the authority poll's
one query costs as a worker holds more runs (sqlite run storage, as in the demo)."""

from __future__ import annotations

import time

from benchmarks.cancel_latency import measure, start_workers, terminate
from benchmarks.harness import Context
from benchmarks.stats import Row, percentile
from dagster_taskiq_cancel.worker.authority import held_runs
from dagster_taskiq_cancel_tests.jobs import sleepy_job
from dagster_taskiq_cancel_tests.stack import Deployment

SCENARIO = "5 scaling"
HELD = (1, 10, 100)


def cancel_latency(ctx: Context, workers: int) -> Row:
    with Deployment(ctx.scratch(f"scaling-{workers}"), ctx.endpoint_url) as deployment:
        start_workers(deployment, workers, ctx.size.scaling_cancels // workers + 2)
        timings = measure(
            deployment, {"ours": terminate}, ctx.size.scaling_cancels, ctx.size.cancel_batch
        )["ours"]
    signalled = percentile(timings.signalled, 50) if timings.signalled else float("nan")
    note = f"{workers} worker(s): median terminate → SIGTERM {signalled:.3f} s"
    if timings.missed:
        note += f"; {timings.missed} missed the deadline"
    return Row(SCENARIO, f"child gone, {workers} worker(s) [s]", timings.gone, note=note)


def poll_cost(ctx: Context) -> list[Row]:
    """Time ``held_runs`` (the poll's one query) for 1, 10 and 100 held run ids."""
    with Deployment(ctx.scratch("poll-cost"), ctx.endpoint_url) as deployment:
        run_ids = [deployment.create_run(sleepy_job).run_id for _ in range(max(HELD))]
        rows = []
        for held in HELD:
            samples = []
            for _ in range(ctx.size.poll_cost_repeats):
                started = time.perf_counter()
                statuses = held_runs(deployment.instance, run_ids[:held])
                samples.append((time.perf_counter() - started) * 1000)
                assert len(statuses) == held and all(statuses.values())
            rows.append(Row(SCENARIO, f"poll query, {held} held run(s) [ms]", samples))
        return rows


def run(ctx: Context) -> list[Row]:
    rows = [cancel_latency(ctx, workers) for workers in ctx.size.scaling_workers]
    return rows + poll_cost(ctx)
