"""Worker start-up calls against the number of hint queues present, and kv rows after many boots.

``python -m benchmarks.startup_cost [--queues 0 200 1000] [--boots 1000]`` starts a moto server
and measures today's package and main before the fleet work (``baseline.BEFORE_FLEET``) side by
side, each in its own process against its own sqlite instance and queue name:

- start-up: one worker's start-up (the package's own functions) with N other workers' hint
  queues present, those workers alive (fresh heartbeats, queues older than the heartbeat
  timeout: a rolling restart's case); SQS calls counted at ``SyncQueues.call``, storage calls
  as SQL statements executed. Today's figure adds, apart, the first sweep step, which runs off
  the start-up path once the worker serves.
- rows: heartbeat rows left in the kv table after B boots, one in ten killed (no clean exit),
  then one sweep round of the two workers still alive.

The start-up sequence is what changed, so it is the one place that asks which version runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import sqlalchemy as db
import yaml
from dagster import DagsterInstance
from sqlalchemy.engine import Engine

from benchmarks.baseline import BEFORE_FLEET, run_with
from benchmarks.harness import Context
from benchmarks.stats import Row
from dagster_taskiq_cancel import heartbeats, hints
from dagster_taskiq_cancel.local_sqs import SERVERS
from dagster_taskiq_cancel.queues import SyncQueues
from dagster_taskiq_cancel.settings import TaskiqCancelSettings
from dagster_taskiq_cancel.worker import process
from dagster_taskiq_cancel.worker.worker import Worker

TIMEOUT = 1.0
TODAY = hasattr(process, "start_up")


class CountingQueues(SyncQueues):
    def __init__(self, settings: TaskiqCancelSettings) -> None:
        super().__init__(settings)
        self.calls = 0

    def call(self, method: str, **kwargs: Any) -> Any:
        self.calls += 1
        return super().call(method, **kwargs)


class Statements:
    def __init__(self) -> None:
        self.count = 0
        db.event.listen(Engine, "before_cursor_execute", self)

    def __call__(self, *_args: Any) -> None:
        self.count += 1


def start(worker: Worker, queues: SyncQueues, instance: DagsterInstance, full: bool) -> None:
    """The version's start-up; ``full=False`` leaves out the old full scan (rows figure only,
    where it deletes no row)."""
    if TODAY:
        asyncio.run(process.start_up(worker, queues))
        return
    hints.create(queues, worker.worker_id)
    heartbeats.beat(instance, worker.worker_id, worker.holding())  # its first beat, at once
    if full:
        hints.remove_stale(queues, instance, TIMEOUT, worker.hint_queue)


def leave(worker: Worker, queues: SyncQueues) -> None:
    if TODAY:
        asyncio.run(process.leave(worker, queues))
    else:
        hints.delete(queues, worker.hint_queue)
    worker.close()


def fleet(instance: DagsterInstance, queues: SyncQueues, count: int) -> None:
    """``count`` live workers' hint queues, with fresh heartbeats for as long as we measure."""
    for index in range(count):
        worker_id = f"fleet-host:{index}:{uuid.uuid4().hex[:8]}"
        heartbeats.beat(instance, worker_id, heartbeats.Beat(time.time() + 3600, frozenset()))
        hints.create(queues, worker_id)


def measure(endpoint: str, counts: list[int], boots: int) -> dict[str, Any]:
    home = Path(tempfile.mkdtemp(prefix="startup-cost-"))
    (home / "dagster.yaml").write_text(yaml.safe_dump({"telemetry": {"enabled": False}}))
    settings = TaskiqCancelSettings(
        queue_name=f"b{uuid.uuid4().hex[:10]}",
        endpoint_url=endpoint,
        heartbeat_timeout_seconds=TIMEOUT,
    )
    queues = CountingQueues(settings)
    queues.create_all()
    statements = Statements()
    result: dict[str, Any] = {"startup": {}, "rows": {}}
    with DagsterInstance.from_config(str(home)) as instance:
        present = 0
        for count in counts:
            fleet(instance, queues, count - present)
            present = count
            time.sleep(TIMEOUT)  # the fleet's queues are older than the timeout, as in a restart
            worker = Worker(settings, instance)
            sqs, sql = queues.calls, statements.count
            began = time.perf_counter()
            start(worker, queues, instance, full=True)
            figures = {
                "sqs": queues.calls - sqs,
                "storage": statements.count - sql,
                "seconds": round(time.perf_counter() - began, 3),
            }
            if TODAY:
                from dagster_taskiq_cancel.worker import sweep

                sqs, sql = queues.calls, statements.count
                sweep.step(instance, queues, worker.worker_id, worker.worker_id, TIMEOUT)
                figures["first_sweep_sqs"] = queues.calls - sqs
                figures["first_sweep_storage"] = statements.count - sql
            result["startup"][count] = figures
            leave(worker, queues)
        result["rows"] = rows_after_boots(instance, settings, boots)
    return result


def rows_after_boots(
    instance: DagsterInstance, settings: TaskiqCancelSettings, boots: int
) -> dict[str, int]:
    queues = SyncQueues(settings)
    before = len(heartbeats_rows(instance))
    live = [Worker(settings, instance) for _ in range(2)]
    for worker in live:
        start(worker, queues, instance, full=False)
    for index in range(boots):
        worker = Worker(settings, instance)
        start(worker, queues, instance, full=False)
        if index % 10:
            leave(worker, queues)
        else:
            worker.close()  # killed
    left_at_end = len(heartbeats_rows(instance)) - before
    if TODAY:
        from dagster_taskiq_cancel.worker import sweep

        time.sleep(TIMEOUT)  # the killed workers' beats go stale; the live ones beat again
        cursor = live[0].worker_id
        for _ in range(len(heartbeats_rows(instance)) // sweep.BATCH + 1):
            for worker in live:
                asyncio.run(worker.register())
            cursor, _ = sweep.step(instance, queues, live[0].worker_id, cursor, TIMEOUT)
    swept = len(heartbeats_rows(instance)) - before
    for worker in live:
        leave(worker, queues)
    return {"boots": boots, "live": len(live), "after_boots": left_at_end, "after_sweep": swept}


def heartbeats_rows(instance: DagsterInstance) -> list[str]:
    table = db.table("kvs", db.column("key"))
    query = db.select(table.c.key).where(table.c.key.like("dagster-taskiq/heartbeat/%"))
    with instance.run_storage.connect() as conn:  # type: ignore[attr-defined]
        return [row[0] for row in conn.execute(query)]


def side_by_side(endpoint: str, counts: list[int], boots: int) -> dict[str, Any]:
    """The figures of main before the fleet work and of today's package, each in its own
    process (``baseline.run_with``)."""
    figures = {}
    own = [*map(str, counts), "--boots", str(boots)]
    for label, commit in (("before", BEFORE_FLEET), ("today", None)):
        out = run_with(
            commit,
            "benchmarks.startup_cost",
            "--endpoint",
            endpoint,
            "--queues",
            *own,
            timeout=3600,
        )
        figures[label] = json.loads(out.stdout.strip().splitlines()[-1])
    return figures


def run(ctx: Context) -> list[Row]:
    """The ``startup`` scenario of ``python -m benchmarks``."""
    counts, boots = [0, 200, 1000], 1000
    figures = side_by_side(ctx.endpoint_url, counts, boots)
    before, today = figures["before"], figures["today"]
    peer = "main 94b9a24"
    table = []
    for count in map(str, counts):
        old, new = before["startup"][count], today["startup"][count]
        for what, key in (("SQS calls", "sqs"), ("SQL statements", "storage")):
            table.append(
                Row(
                    "startup",
                    f"worker start-up {what}, {count} live workers' hint queues",
                    [new[key]],
                    peer,
                    [old[key]],
                    note=f"first sweep step apart (off the start-up path): "
                    f"{new['first_sweep_sqs']} SQS, {new['first_sweep_storage']} SQL",
                )
            )
    table.append(
        Row(
            "startup",
            f"heartbeat rows left after {boots} boots (1 in 10 killed, 2 live)",
            [today["rows"]["after_sweep"]],
            peer,
            [before["rows"]["after_sweep"]],
            note=f"before the live workers' sweep round: {today['rows']['after_boots']}",
        )
    )
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.startup_cost")
    parser.add_argument("--queues", type=int, nargs="+", default=[0, 200, 1000])
    parser.add_argument("--boots", type=int, default=1000)
    parser.add_argument("--endpoint", help="measure only, against this SQS endpoint")
    args = parser.parse_args(argv)
    if args.endpoint:
        print(json.dumps(measure(args.endpoint, sorted(args.queues), args.boots)))
        return 0
    server = SERVERS["moto"]().start()
    try:
        figures = side_by_side(server.endpoint_url, args.queues, args.boots)
    finally:
        server.stop()
    json.dump(figures, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
