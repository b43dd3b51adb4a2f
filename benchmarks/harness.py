"""What every scenario shares: sizes, the SQS server, the machine record, and the output.

Scenarios are functions ``(Context) -> list[Row]``; the harness runs them one after another so
that they never compete for the 2 cores, and records a failed scenario as a row instead of
losing the others' figures.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.stats import Row
from dagster_taskiq_cancel.local_sqs import SERVERS

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("dagster", "dagster-webserver", "taskiq", "taskiq-aio-sqs", "moto", "aioboto3")


@dataclass(frozen=True)
class Size:
    """How many samples each scenario takes; ``short`` fits `make bench` in minutes on 2 cores."""

    cancels: int  # per variant (ours and poll-only) in scenario 1
    cancel_batch: int  # runs alive at once: each is a Dagster process of ~150 MB
    ui_pairs: int
    idle_window_s: float
    kicks: int
    scaling_workers: tuple[int, ...]
    scaling_cancels: int
    poll_cost_repeats: int
    bulk_runs: int
    default_pairs: int  # same job under DefaultRunLauncher and ours, back to back
    # Simulated busy workers. 100 of 94b9a24's already need more than 2 cores (its per-worker
    # rates fall, and the row's note counts the workers' warnings); long adds 300.
    fleet_workers: tuple[int, ...]
    fleet_window_s: float  # each fleet size is measured over this window, per version
    wide_steps: int  # mapped steps of the one run whose admissions are timed


SIZES = {
    "short": Size(20, 20, 3, 60.0, 50, (1, 4), 6, 30, 250, 10, (10, 100), 20.0, 300),
    "long": Size(
        100, 20, 10, 300.0, 500, (1, 2, 4, 8), 24, 200, 1000, 30, (10, 100, 300), 60.0, 1000
    ),
}


@dataclass
class Context:
    """The run's size, SQS endpoint and scratch folder, handed to every scenario."""

    size: Size
    sqs_kind: str
    endpoint_url: str
    root: Path
    storages: tuple[str, ...] = ("sqlite",)  # run storages of the bulk scenario

    def scratch(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path


Scenario = Callable[[Context], list[Row]]


# --- SQS server ----------------------------------------------------------------------------------


@contextmanager
def sqs_server(kind: str, root: Path) -> Iterator[str]:
    """Start moto (the default) or ministack on 127.0.0.1 and yield its endpoint; stop by pid."""
    if kind == "moto":
        # The request recorder (idle-cost scenario) appends to this file while recording.
        os.environ["MOTO_RECORDER_FILEPATH"] = str(root / "moto_recording.jsonl")
    server = SERVERS[kind]().start()
    try:
        yield server.endpoint_url
    finally:
        server.stop()


@contextmanager
def output_to(log: Path) -> Iterator[None]:
    """Send this process's stdout/stderr (and so every child started meanwhile, such as
    `dagster dev`) to ``log``, so that the terminal shows progress lines and the table only."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with log.open("ab") as file:
        os.dup2(file.fileno(), 1)
        os.dup2(file.fileno(), 2)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, copy in zip((1, 2), saved, strict=True):
            os.dup2(copy, fd)
            os.close(copy)


# --- the machine ---------------------------------------------------------------------------------


def machine() -> dict[str, object]:
    """What the figures depend on, recorded beside them."""
    meminfo = Path("/proc/meminfo").read_text().split("\n", 1)[0].split()
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "cores": os.cpu_count(),
        "memory_gib": round(int(meminfo[1]) / 2**20, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": os.getloadavg(),
        "packages": versions,
    }


# --- output --------------------------------------------------------------------------------------

COLUMNS = ("scenario", "metric", "n", "median", "p90", "p99", "max", "peer", "peer median", "ratio")


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:.0f}"
        return f"{value:.1f}" if abs(value) >= 10 else f"{value:.3f}"
    return str(value)


def table(rows: Sequence[Row]) -> str:
    """The one printed table; notes follow it, numbered, so the columns stay narrow."""
    lines = []
    notes = []
    for row in rows:
        s = row.summary()
        metric = str(s["metric"])
        if row.note:
            notes.append(row.note)
            metric += f" [{len(notes)}]"
        cells = (s["scenario"], metric, s["n"], s["median"], s["p90"], s["p99"], s["max"])
        lines.append([_fmt(c) for c in (*cells, s["peer"] or "-", s["peer_median"], s["ratio"])])
    widths = [max(len(c), *(len(line[i]) for line in lines)) for i, c in enumerate(COLUMNS)]
    out = ["  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths, strict=True))]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines]
    out += [f"[{i}] {note}" for i, note in enumerate(notes, 1)]
    return "\n".join(out)


def run_all(
    scenarios: dict[str, Scenario],
    size_name: str,
    sqs_kind: str,
    out: Path,
    storages: Sequence[str] = ("sqlite",),
) -> tuple[list[Row], bool]:
    """Run the scenarios in order on one SQS server; print the table, write the JSON."""
    started = time.monotonic()
    record = {
        "machine": machine(),
        "size": size_name,
        "sqs": sqs_kind,
        "storages": list(storages),
    }
    rows: list[Row] = []
    ok = True
    logs = out.parent / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for old in logs.glob("*.log"):
        old.unlink()
    with tempfile.TemporaryDirectory(prefix="dtc-bench-") as tmp:
        root = Path(tmp)
        with sqs_server(sqs_kind, root) as endpoint:
            ctx = Context(SIZES[size_name], sqs_kind, endpoint, root, tuple(storages))
            for name, scenario in scenarios.items():
                log = logs / f"{name}.log"
                print(f"{time.monotonic() - started:5.0f}s  {name} (output in {log})", flush=True)
                try:
                    with output_to(log):
                        rows += scenario(ctx)
                except Exception as exc:
                    ok = False
                    with output_to(log):
                        traceback.print_exc()
                    reason = (str(exc).strip().splitlines() or [""])[-1]
                    rows.append(Row(name, "FAILED", [], note=f"{type(exc).__name__}: {reason}"))
    record["duration_s"] = round(time.monotonic() - started, 1)
    record["load_average_at_end"] = os.getloadavg()
    record["rows"] = [r.summary() for r in rows]
    record["size_parameters"] = asdict(SIZES[size_name])
    out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"\nSQS: {sqs_kind}; size: {size_name}; took {record['duration_s']}s; machine:")
    print(json.dumps(record["machine"]))
    print(table(rows))
    print(f"\nJSON: {out}")
    return rows, ok
