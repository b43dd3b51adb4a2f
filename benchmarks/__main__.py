"""``python -m benchmarks [--size short|long] [--sqs moto|ministack] [--only NAME ...]
[--storage sqlite postgres]``."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from benchmarks import (
    beside_default,
    bulk_cancel,
    cancel_latency,
    dispatch,
    fleet,
    idle_cost,
    pg_connections,
    poll_noise,
    scaling,
    startup_cost,
    ui_header,
    ui_terminate,
    wide,
)
from benchmarks.harness import SIZES, Scenario, run_all
from dagster_taskiq_cancel.local_sqs import SERVERS

SCENARIOS: dict[str, Scenario] = {
    "cancel": cancel_latency.run,
    "ui": ui_terminate.run,
    "idle": idle_cost.run,
    "dispatch": dispatch.run,
    "scaling": scaling.run,
    "bulk": bulk_cancel.run,
    "header": ui_header.run,
    "default": beside_default.run,
    "pgconn": pg_connections.run,
    "fleet": fleet.run,
    "wide": wide.run,
    "startup": startup_cost.run,
    "poll": poll_noise.run,
}


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    """SIGTERM unwinds like Ctrl-C, so every finally block stops the processes it started."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--size", choices=sorted(SIZES), default="short")
    parser.add_argument("--sqs", choices=sorted(SERVERS), default="moto")
    parser.add_argument("--only", nargs="+", choices=list(SCENARIOS), metavar="NAME")
    parser.add_argument(
        "--storage",
        nargs="+",
        choices=["sqlite", "postgres"],
        default=["sqlite"],
        help="run storages of the bulk scenario (postgres: a private local cluster)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "latest.json"
    )
    args = parser.parse_args(argv)
    chosen = {name: SCENARIOS[name] for name in args.only or SCENARIOS}
    _, ok = run_all(chosen, args.size, args.sqs, args.out, args.storage)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
