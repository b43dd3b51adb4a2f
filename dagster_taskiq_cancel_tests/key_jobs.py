"""Jobs whose op writes down which signing keys its process can read, one line per execution.

(No ``from __future__ import annotations``: Dagster reads the ops' annotations at definition time.)
"""

import os
from pathlib import Path

import dagster as dg

from dagster_taskiq_cancel import taskiq_executor
from dagster_taskiq_cancel.settings import KEY_ENV_VARS


class KeyMarker(dg.Config):
    marker_dir: str


@dg.op
def note_keys(context: dg.OpExecutionContext, config: KeyMarker) -> None:
    """Append the key variables this op's process sees with a value (``-`` for none)."""
    seen = sorted(name for name in KEY_ENV_VARS if os.environ.get(name))
    directory = Path(config.marker_dir)
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / f"{context.run_id}.keys").open("a") as f:
        f.write(f"{' '.join(seen) or '-'}\n")


@dg.job
def keys_job() -> None:
    """The default (multiprocess) executor: its run process sends no tasks."""
    note_keys()


@dg.job(executor_def=taskiq_executor)
def step_keys_job() -> None:
    """Steps sent as tasks, which its run process must sign."""
    note_keys()


def seen_keys(marker_dir: Path, run_id: str) -> list[str]:
    return (marker_dir / f"{run_id}.keys").read_text().splitlines()
