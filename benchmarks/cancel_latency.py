"""Scenario 1: terminate a running run on 4 worker processes, with and without the cancel message.

The peer is our own poll alone: ``report_run_canceling`` records exactly the intent that
``terminate()`` records, but sends no message, so the difference is what the fast path buys.
Both variants alternate on the same runs' workers, so load and poll phase hit them alike.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from dagster import DagsterRunStatus

from benchmarks.harness import Context
from benchmarks.stats import Row
from dagster_taskiq_cancel_tests.jobs import sleepy_job
from dagster_taskiq_cancel_tests.stack import Deployment, pid_alive, wait_for

SCENARIO = "1 cancel, running run"
DEADLINE_S = 30.0
Request = Callable[[Deployment, str], object]
STOPPING = re.compile(r"^(?P<at>\S+ \S+) INFO \S+: Stopping task (?P<task>[0-9a-f-]{36}) ", re.M)


def terminate(deployment: Deployment, run_id: str) -> object:
    """Ours: the launcher's terminate(), as the UI's mutation calls it."""
    return deployment.instance.run_launcher.terminate(run_id)


def intent_only(deployment: Deployment, run_id: str) -> object:
    """Poll only: the durable intent without the message (what a lost message leaves)."""
    run = deployment.instance.get_run_by_id(run_id)
    assert run is not None
    return deployment.instance.report_run_canceling(run)


@dataclass
class Timings:
    """Per variant, seconds from the request to: the worker's SIGTERM (from its log), the
    child gone, the run CANCELED; and how many cancels never stopped the child."""

    signalled: list[float] = field(default_factory=list)
    gone: list[float] = field(default_factory=list)
    canceled: list[float] = field(default_factory=list)
    missed: int = 0


def start_workers(deployment: Deployment, count: int, concurrency: int) -> None:
    """``count`` worker processes under one parent (started in parallel), all listening."""
    deployment.start_worker("--workers", str(count), "--concurrency", str(concurrency))
    index = len(deployment.workers) - 1
    wait_for(lambda: deployment.worker_log(index).count(" ready") >= count, 120, f"{count} workers")


def stop_times(deployment: Deployment) -> dict[str, float]:
    """When each worker logged "Stopping task <run id>" (epoch seconds, ms resolution)."""
    found = {}
    for log in deployment.logs.glob("worker-*.log"):
        for match in STOPPING.finditer(log.read_text(errors="replace")):
            when = datetime.strptime(match["at"], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            found.setdefault(match["task"], when)
    return found


def time_one(
    deployment: Deployment, run_id: str, pid: int, request: Request, into: Timings
) -> float:
    """Send one request, poll (5 ms) until the child is gone and the run CANCELED; returns the
    request's wall-clock time, to match against the worker's log afterwards."""
    requested_at = time.time()
    started = time.monotonic()
    request(deployment, run_id)
    deadline = started + DEADLINE_S
    gone = canceled = None
    while (gone is None or canceled is None) and time.monotonic() < deadline:
        now = time.monotonic()
        if gone is None and not pid_alive(pid):
            gone = now - started
        if canceled is None and deployment.status(run_id) == DagsterRunStatus.CANCELED:
            canceled = now - started
        time.sleep(0.005)
    if gone is None:
        into.missed += 1
    else:
        into.gone.append(gone)
    if canceled is not None:
        into.canceled.append(canceled)
    return requested_at


def measure(
    deployment: Deployment, variants: dict[str, Request], per_variant: int, batch: int
) -> dict[str, Timings]:
    """Launch runs ``batch`` at a time, wait until all run, cancel them one by one alternating
    the variants; the other runs keep running meanwhile, as on a busy fleet."""
    results = {name: Timings() for name in variants}
    requested: dict[str, tuple[str, float]] = {}
    names = list(variants) * per_variant
    for start in range(0, len(names), batch):
        chunk = names[start : start + batch]
        run_ids = [deployment.launch(sleepy_job, seconds=900) for _ in chunk]
        pids = {run_id: deployment.op_pid(run_id, timeout=300) for run_id in run_ids}
        for run_id in run_ids:
            deployment.wait_status(run_id, {DagsterRunStatus.STARTED}, timeout=120)
        for name, run_id in zip(chunk, run_ids, strict=True):
            at = time_one(deployment, run_id, pids[run_id], variants[name], results[name])
            requested[run_id] = (name, at)
    stopped = stop_times(deployment)  # a run's task id is its run id
    for run_id, (name, at) in requested.items():
        if run_id in stopped:
            results[name].signalled.append(stopped[run_id] - at)
    return results


def run(ctx: Context) -> list[Row]:
    workers = 4
    with Deployment(ctx.scratch("cancel"), ctx.endpoint_url) as deployment:
        concurrency = ctx.size.cancel_batch // workers + 2
        start_workers(deployment, workers, concurrency)
        results = measure(
            deployment,
            {"ours": terminate, "poll": intent_only},
            ctx.size.cancels,
            ctx.size.cancel_batch,
        )
    ours, poll = results["ours"], results["poll"]
    peer = "poll only, no message"
    delivered = 100.0 * len(ours.gone) / (len(ours.gone) + ours.missed)
    return [
        Row(SCENARIO, "terminate → worker SIGTERMs [s]", ours.signalled, peer, poll.signalled),
        Row(SCENARIO, "terminate → child gone [s]", ours.gone, peer, poll.gone),
        Row(SCENARIO, "terminate → CANCELED [s]", ours.canceled, peer, poll.canceled),
        Row(
            SCENARIO,
            "delivered within 30 s [%]",
            [delivered],
            note=f"{workers} worker processes; {ours.missed} of ours and {poll.missed} "
            "poll-only cancels missed the 30 s deadline",
        ),
    ]
