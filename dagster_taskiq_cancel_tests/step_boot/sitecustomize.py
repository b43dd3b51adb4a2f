"""Holds a multiprocessing step process at interpreter start-up, before it imports anything.

On ``PYTHONPATH`` of a test's worker, Python runs this in every process it starts; only a
multiprocessing spawn child (a multiprocess executor's step process) waits, while the file
named by ``TEST_STEP_BOOT_GATE`` exists: the moment a busy machine spends importing Dagster.
"""

import sys

if "--multiprocessing-fork" in sys.orig_argv:
    from dagster_taskiq_cancel_tests.gates import hold

    hold("TEST_STEP_BOOT_GATE")
