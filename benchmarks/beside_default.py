"""Scenario 8: the same job stopped under Dagster's DefaultRunLauncher and ours (4 workers).

Both `dagster dev` stacks run at once on the example project, as in scenario 2. Each pair
launches ``long_job`` on both, waits until its step runs, notes the processes the run added
(run process and step process; ours also the task's guard), then sends the UI's
``terminateRuns`` and times two things: every one of those processes gone, and the run
CANCELED in the run storage (read directly, polled every 5 ms, so that the figure is not a
GraphQL round trip).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus

from benchmarks import ui_terminate
from benchmarks.harness import Context
from benchmarks.stats import Row, pairwise_ratio_row, percentile
from dagster_taskiq_cancel.dev import DevStack
from dagster_taskiq_cancel_tests.stack import descendant_pids, pid_alive, wait_for

SCENARIO = "8 beside DefaultRunLauncher"
WORKERS = 4
DEADLINE_S = 60.0


@dataclass
class Samples:
    gone: list[float] = field(default_factory=list)
    canceled: list[float] = field(default_factory=list)


def run_processes(stack: DevStack, instance: DagsterInstance, run_id: str) -> set[int]:
    """The run process (its pid is on the run's RUN_START event), everything below it (the step
    process, log tailers) and, on our stack, the task's guard above it."""
    (start,) = instance.all_logs(run_id, of_type=DagsterEventType.RUN_START)
    pid = start.dagster_event.pid if start.dagster_event else None
    if pid is None:
        raise RuntimeError(f"run {run_id}: RUN_START carries no pid")
    found = {pid, *descendant_pids(pid)}
    if stack.workers:
        found.add(int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]))
    return found


def stop_one(stack: DevStack, instance: DagsterInstance, into: Samples) -> None:
    """Launch, wait for the step, then time terminateRuns → processes gone and → CANCELED."""
    run_id = ui_terminate.launch(stack)
    wait_for(lambda: ui_terminate.step_running(stack, run_id), 180, f"{run_id} step running")
    added = run_processes(stack, instance, run_id)
    started = time.monotonic()
    result = ui_terminate.graphql(stack, ui_terminate.TERMINATE, ids=[run_id])["terminateRuns"]
    outcomes = [r["__typename"] for r in result.get("terminateRunResults", [])]
    if outcomes != ["TerminateRunSuccess"]:
        raise RuntimeError(f"terminateRuns: {result}")
    gone = canceled = None
    while (gone is None or canceled is None) and time.monotonic() - started < DEADLINE_S:
        now = time.monotonic() - started
        if gone is None and not any(pid_alive(pid) for pid in added):
            gone = now
        if canceled is None:
            run = instance.get_run_by_id(run_id)
            if run is not None and run.status == DagsterRunStatus.CANCELED:
                canceled = now
        time.sleep(0.005)
    if gone is None or canceled is None:
        alive = {
            pid: Path(f"/proc/{pid}/cmdline").read_bytes()[:120] for pid in added if pid_alive(pid)
        }
        raise RuntimeError(
            f"run {run_id}: not stopped within {DEADLINE_S:.0f}s (CANCELED after {canceled}, "
            f"alive {alive})"
        )
    into.gone.append(gone)
    into.canceled.append(canceled)


def run(ctx: Context) -> list[Row]:
    ours, default = ui_terminate.start_stacks(ctx, workers=WORKERS)
    instances: list[DagsterInstance] = []
    try:
        with ThreadPoolExecutor(2) as pool:
            for future in [pool.submit(ours.start), pool.submit(default.start)]:
                future.result()
        instances = [DagsterInstance.from_config(str(s.home)) for s in (ours, default)]
        mine, theirs = Samples(), Samples()
        order = [(ours, instances[0], mine), (default, instances[1], theirs)]
        for index in range(ctx.size.default_pairs):
            for stack, instance, samples in order if index % 2 == 0 else reversed(order):
                stop_one(stack, instance, samples)
    finally:
        for instance in instances:
            instance.dispose()
        for stack in (ours, default):
            stack.stop()
    return [
        ratio_row("terminate → last process gone [s]", mine.gone, theirs.gone),
        ratio_row("terminate → CANCELED [s]", mine.canceled, theirs.canceled),
    ]


def ratio_row(metric: str, ours: list[float], theirs: list[float]) -> Row:
    """The pairwise row, its note extended with ours/Default at p99 (the goal is ≤ 1.2 at both)."""
    row = pairwise_ratio_row(SCENARIO, metric, ours, theirs, "DefaultRunLauncher")
    p99 = percentile(ours, 99) / percentile(theirs, 99)
    row.note = f"{WORKERS} workers; ratio at p99 {p99:.2f}; {row.note}"
    return row
