"""A multiprocess job whose step process is held while it imports this module.

Dagster's run process imports the job's module too; only a step process (a multiprocessing
child of the run process) waits here, while the file named by ``TEST_STEP_IMPORT_GATE`` exists:
the moment a large code location spends importing in each step process.
"""

import multiprocessing

import dagster as dg

from dagster_taskiq_cancel_tests.gates import hold
from dagster_taskiq_cancel_tests.jobs import sleeper

if multiprocessing.parent_process() is not None:
    hold("TEST_STEP_IMPORT_GATE")


@dg.job(executor_def=dg.multiprocess_executor)
def step_start_job() -> None:
    sleeper()
