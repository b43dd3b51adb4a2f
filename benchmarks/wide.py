"""Scenario ``wide``: admitting a step of a wide run, by the step's index, today and before.

A worker admits each step task of a run: it checks that the run's executor launched it, claims
it and rebuilds the step's arguments. Before the fleet work this read the run's whole event log
(every launch event, then every event for ``build_for_reexecution``), so the thousandth step
of a run cost many times the tenth. ``benchmarks.wide_run`` launches and admits the steps of one
fanned-out run in process against a private Postgres, with the run process's and the worker's
own functions, and times each admission; it runs once with today's package and once with main
before the fleet work (``baseline``), each on a database of its own. The figure is the ratio
of the median admission time at the last index to that at step 10 (goal: at most 1.5), by
wall clock and by the measuring process's CPU time (steadier on a busy machine).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import yaml

from benchmarks import wide_run
from benchmarks.baseline import BEFORE_FLEET, run_with
from benchmarks.harness import Context
from benchmarks.stats import Row
from dagster_taskiq_cancel_tests.postgres import PostgresCluster, storage_config

SCENARIO = "9 wide run"
VERSIONS = {"today": None, f"main {BEFORE_FLEET}": BEFORE_FLEET}


def indexes(steps: int) -> list[int]:
    """Step 10, step 100 where the run is that wide, and the run's last steps."""
    return [i for i in (10, 100) if i + wide_run.SAMPLES < steps] + [steps - wide_run.SAMPLES]


def _admissions(
    home: Path, endpoint_url: str, steps: int, commit: str | None
) -> dict[int, list[float]]:
    """Admission [wall, CPU] seconds by step index, of the package at ``commit``."""
    args = [str(home), endpoint_url, str(steps), *map(str, indexes(steps))]
    out = run_with(commit, "benchmarks.wide_run", *args, timeout=3600).stdout
    return {int(i): s for i, s in json.loads(out.strip().splitlines()[-1]).items()}


def _rows(name: str, steps: int, seconds: dict[int, list[float]], clock: int) -> list[Row]:
    """One row per timed index and the last-to-10 ratio, by wall clock (0) or CPU (1)."""
    what = ("wall", "CPU")[clock]
    rows, medians = [], {}
    for index in indexes(steps):
        samples = [seconds[index + k][clock] * 1000 for k in range(wide_run.SAMPLES)]
        medians[index] = statistics.median(samples)
        metric = f"admission {what}, step {index} of {steps}, {name} [ms]"
        rows.append(Row(SCENARIO, metric, samples))
    last = max(medians)
    note = f"{name}: goal <= 1.5 (Postgres, one run of {steps} mapped steps)"
    ratio = medians[last] / medians[10]
    rows.append(
        Row(SCENARIO, f"admission {what} step {last} / step 10, {name}", [ratio], note=note)
    )
    return rows


def run(ctx: Context) -> list[Row]:
    steps = ctx.size.wide_steps
    cluster = PostgresCluster(durable=True).start()  # commits wait for the disk
    rows: list[Row] = []
    try:
        for name, commit in VERSIONS.items():
            home = ctx.scratch(f"wide-{commit or 'today'}")
            config = {"telemetry": {"enabled": False}, **storage_config(cluster.database())}
            (home / "dagster.yaml").write_text(yaml.safe_dump(config))
            seconds = _admissions(home, ctx.endpoint_url, steps, commit)
            rows += _rows(name, steps, seconds, 0) + _rows(name, steps, seconds, 1)
    finally:
        cluster.stop()
    return rows
