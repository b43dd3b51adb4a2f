"""The package as it was at an earlier commit, for figures measured beside today's in one run.

A scenario that compares against an earlier version runs its measuring code in a subprocess
with ``PYTHONPATH`` set to ``tree(commit)``: the package (and its test helpers) of that commit,
extracted once with ``git archive``. The benchmark code itself stays today's, so it must call
only what both versions have.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

from benchmarks.harness import REPO

# Main before the fleet work (issues 27 and 28): the "today" of the fleet figures.
BEFORE_FLEET = "94b9a24"
_PACKAGES = ("dagster_taskiq_cancel", "dagster_taskiq_cancel_tests")


def tree(commit: str = BEFORE_FLEET) -> Path:
    """A folder holding the package of ``commit`` (extracted on first use, then reused)."""
    target = REPO / "benchmarks" / "results" / f"tree-{commit}"
    if (target / _PACKAGES[0]).is_dir():
        return target
    target.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", commit, *_PACKAGES],
        check=True,
        capture_output=True,
    ).stdout
    partial = target.with_suffix(".tar")
    partial.write_bytes(archive)
    with tarfile.open(partial) as tar:
        tar.extractall(target, filter="data")
    partial.unlink()
    return target


def run_with(
    commit: str | None, module: str, *args: str, timeout: float = 1800
) -> subprocess.CompletedProcess[str]:
    """``python -m module args`` with the package of ``commit`` first on the path (``None``:
    today's). The module is a benchmark module, always today's; its stdout is returned."""
    path = [str(REPO)] if commit is None else [str(tree(commit)), str(REPO)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=path[0],
    )
