"""A job whose module is slow to import on the workers, as a large code location is.

Dagster's run process reads the run's status, then imports the job's module, then writes
RUN_START: a cancel recorded in between is what RUN_START would overwrite. Workers started with
``TEST_SLOW_IMPORT_SECONDS`` widen that window, so that a test lands in it every time; the test
process itself imports this module without the variable.
"""

import os
import time

import dagster as dg

from dagster_taskiq_cancel_tests.jobs import sleeper

_import_done = time.monotonic() + float(os.environ.get("TEST_SLOW_IMPORT_SECONDS", "0"))
while time.monotonic() < _import_done:  # the workload: a slow import, not a synchronisation
    time.sleep(0.05)


@dg.job(executor_def=dg.in_process_executor)
def slow_import_job() -> None:
    sleeper()
