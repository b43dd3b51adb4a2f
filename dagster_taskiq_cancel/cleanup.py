"""Cleanup handlers: user code the worker runs after it stopped a cancelled task.

Declared on a job with run tags, so the worker (which does not load code locations) knows it:

    @dg.job(tags=cleanup_on_cancel("my_project.cleanup:drop_scratch", attempts=3))

The handler runs in its own process (``python -m dagster_taskiq_cancel.cleanup``), so it can
neither block nor crash the worker, and gets a ``CleanupContext``. It never runs for work that
finished on its own. When every attempt fails the worker acknowledges ``cleanup_failed`` and the
reconciliation sensor ends the run FAILURE with the error.
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

from dagster_taskiq_cancel.tasks import TAG_PREFIX

CLEANUP_TAG = f"{TAG_PREFIX}cleanup"
CLEANUP_ATTEMPTS_TAG = f"{TAG_PREFIX}cleanup_attempts"
CLEANUP_BACKOFF_TAG = f"{TAG_PREFIX}cleanup_backoff_seconds"


@dataclass(frozen=True)
class CleanupContext:
    """What the handler is told: which task was stopped, and how."""

    run_id: str
    step_key: str | None
    outcome: str
    attempt: int
    tags: Mapping[str, str]


def cleanup_on_cancel(
    handler: str | Callable[[CleanupContext], object],
    attempts: int = 3,
    backoff_seconds: float = 1.0,
) -> dict[str, str]:
    """Run tags that make the worker call ``handler`` after stopping this job's tasks.

    ``handler`` is a module-level function or its ``"module:function"`` path.
    """
    if attempts < 1 or backoff_seconds < 0:
        raise ValueError("attempts must be at least 1 and backoff_seconds not negative")
    path = handler if isinstance(handler, str) else f"{handler.__module__}:{handler.__qualname__}"
    if ":" not in path or "<" in path:
        raise ValueError(f"cleanup handler {path!r} must be a module-level function")
    return {
        CLEANUP_TAG: path,
        CLEANUP_ATTEMPTS_TAG: str(attempts),
        CLEANUP_BACKOFF_TAG: str(backoff_seconds),
    }


def load_handler(path: str) -> Callable[[CleanupContext], object]:
    module, _, name = path.partition(":")
    target: object = importlib.import_module(module)
    for part in name.split("."):
        target = getattr(target, part)
    if not callable(target):
        raise TypeError(f"{path} is not callable")
    return target


def main(argv: list[str]) -> int:
    """Entry point of the cleanup process: ``<module:function> <context json>``."""
    path, raw = argv
    load_handler(path)(CleanupContext(**json.loads(raw)))
    return 0


def context_json(context: CleanupContext) -> str:
    return json.dumps(asdict(context))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
