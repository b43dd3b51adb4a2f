"""Jobs whose steps run on the taskiq workers (``taskiq_executor``).

Every step appends ``step_key attempt pid worker_pid`` to ``{marker_dir}/{run_id}.steps`` so that
tests can assert what ran, where, how often, and which processes must be gone. Outputs go
through a filesystem IO manager that every worker's step processes share. (No
``from __future__ import annotations``: Dagster reads the ops' annotations at definition time.)
"""

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
from dagster_aws.s3 import S3PickleIOManager, S3Resource

from dagster_taskiq_cancel import taskiq_executor


@dataclass(frozen=True)
class StepRecord:
    step_key: str
    attempt: int
    pid: int
    worker_pid: int


def _worker_pid() -> int:
    """The worker that holds this step process: the parent of its parent, the guard."""
    stat = Path(f"/proc/{os.getppid()}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


class StepMarkers(dg.ConfigurableResource):
    """The test's knobs and the steps' record of what ran."""

    marker_dir: str
    width: int = 6
    fan_out_seconds: float = 0.0
    seconds: float = 0.0
    fail_first_attempt: bool = False

    def record(self, context: dg.OpExecutionContext) -> None:
        """Note this execution and the worker that holds it."""
        step_key = context.get_step_execution_context().step.key
        directory = Path(self.marker_dir)
        directory.mkdir(parents=True, exist_ok=True)
        with (directory / f"{context.run_id}.steps").open("a") as f:
            f.write(f"{step_key} {context.retry_number} {os.getpid()} {_worker_pid()}\n")

    def work(self, seconds: float) -> None:
        """Sleep in short slices so that Dagster's interrupt lands promptly."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(0.05)


def step_records(marker_dir: Path, run_id: str) -> list[StepRecord]:
    path = marker_dir / f"{run_id}.steps"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        step_key, attempt, pid, worker_pid = line.split()
        records.append(StepRecord(step_key, int(attempt), int(pid), int(worker_pid)))
    return records


@dg.op(out=dg.DynamicOut(int))
def fan_out(
    context: dg.OpExecutionContext, markers: StepMarkers
) -> Iterator[dg.DynamicOutput[int]]:
    markers.record(context)
    markers.work(markers.fan_out_seconds)
    for index in range(markers.width):
        yield dg.DynamicOutput(index, mapping_key=str(index))


@dg.op(retry_policy=dg.RetryPolicy(max_retries=1))
def part(context: dg.OpExecutionContext, markers: StepMarkers, index: int) -> int:
    """Retried once: a cancelled step must still never get its second attempt."""
    markers.record(context)
    if markers.fail_first_attempt and context.retry_number == 0:
        raise RuntimeError("failing the first attempt on purpose")
    markers.work(markers.seconds)
    return index * 10


@dg.op
def total(context: dg.OpExecutionContext, markers: StepMarkers, parts: list[int]) -> int:
    markers.record(context)
    return sum(parts)


STEP_RESOURCES = {
    "io_manager": dg.FilesystemIOManager.configure_at_launch(),
    "markers": StepMarkers.configure_at_launch(),
}


@dg.job(executor_def=taskiq_executor, resource_defs=STEP_RESOURCES)
def fan_job() -> None:
    total(fan_out().map(part).collect())


def fan_run_config(root: Path, **markers: Any) -> dict[str, Any]:
    """Run config for ``fan_job``: IO under ``root/io``, markers in ``root/markers``."""
    return {
        "resources": {
            "io_manager": {"config": {"base_dir": str(root / "io")}},
            "markers": {"config": {"marker_dir": str(root / "markers"), **markers}},
        }
    }


@dg.job(
    executor_def=taskiq_executor,
    resource_defs={
        # Steps on different workers share outputs through S3 (the SQS server's S3 API here).
        "io_manager": S3PickleIOManager(
            s3_resource=S3Resource(
                endpoint_url=dg.EnvVar("TEST_S3_ENDPOINT"), region_name="us-east-1"
            ),
            s3_bucket=dg.EnvVar("TEST_S3_BUCKET"),
        ),
        "markers": StepMarkers.configure_at_launch(),
    },
)
def s3_fan_job() -> None:
    total(fan_out().map(part).collect())
