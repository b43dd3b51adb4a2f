"""A multiprocess job whose run process is busy at the moment it launches a step process.

Dagster's multiprocess executor forwards an interrupt only to step processes that exist when it
handles it. The ``launch_blocker`` logger holds the run process for ``block_seconds`` right after
it announced the launch of step ``late`` (as a slow event write does on a busy database), so
that a test's terminate lands exactly there.
"""

import logging
import time
from pathlib import Path

import dagster as dg

from dagster_taskiq_cancel_tests.jobs import MarkerConfig, _record_start


class _BlockOnLaunch(logging.Handler):
    def __init__(self, marker_dir: str, block_seconds: float) -> None:
        super().__init__()
        self.marker = Path(marker_dir) / "launching-late"
        self.block_seconds = block_seconds

    def emit(self, record: logging.LogRecord) -> None:
        if 'Launching subprocess for "late"' in record.getMessage():
            self.marker.parent.mkdir(parents=True, exist_ok=True)
            self.marker.write_text("")
            time.sleep(self.block_seconds)  # the workload: a busy run process


@dg.logger(config_schema={"marker_dir": str, "block_seconds": float})
def launch_blocker(init_context: dg.InitLoggerContext) -> logging.Logger:
    logger = logging.getLogger("launch_blocker")
    logger.setLevel(logging.DEBUG)
    logger.handlers = [_BlockOnLaunch(**init_context.logger_config)]
    return logger


@dg.op
def first() -> int:
    return 1


@dg.op
def late(context: dg.OpExecutionContext, config: MarkerConfig, value: int) -> int:
    _record_start(context, config.marker_dir)
    deadline = time.monotonic() + config.seconds
    while time.monotonic() < deadline:
        time.sleep(0.05)
    return value


@dg.job(executor_def=dg.multiprocess_executor, logger_defs={"launch_blocker": launch_blocker})
def launch_race_job() -> None:
    late(first())


def launch_race_config(marker_dir: Path, block_seconds: float, seconds: float) -> dict:
    return {
        "loggers": {
            "launch_blocker": {
                "config": {"marker_dir": str(marker_dir), "block_seconds": block_seconds}
            }
        },
        "ops": {"late": {"config": {"marker_dir": str(marker_dir), "seconds": seconds}}},
    }
