"""The run's true state once a task's child is gone: what the worker writes, and whether the
run's cleanup handler runs.

Dagster's run process writes the run's end itself when it can. The worker writes only what it
could not (killed, crashed, or an interrupt that landed where Dagster reads it as a failure),
always from the run as re-read here, and always in favour of a recorded cancel: the run storage
is the authority.
"""

from __future__ import annotations

from dagster import DagsterInstance, DagsterRun, DagsterRunStatus

from dagster_taskiq_cancel.worker import keys, pool_slots, records, scale_in
from dagster_taskiq_cancel.worker.authority import cancel_recorded, is_cancelled
from dagster_taskiq_cancel.worker.canceled import record_canceled, what_stopped
from dagster_taskiq_cancel.worker.held import HeldTask


def settle(
    instance: DagsterInstance, worker_id: str, held: HeldTask, returncode: int | None
) -> bool:
    """Leave the run in a true state; True to run cleanup.

    A run task whose run holds a cancel is a cancel, even if the child exited by itself (it
    read CANCELING at start) or Dagster's RUN_START overwrote the cancel: CANCELING is made the
    status again, and the run ends CANCELED. A run process that failed the run after a cancel
    (the interrupt landed in a resume's start-up, or a start race) ends it CANCELED, as asked.
    A cancelled run its process left unended (SIGKILLed, killed before RUN_START, or exited) is
    recorded CANCELED at once (``record_canceled``), not at the sensor's next tick. A run
    process that died without ending a run nobody cancelled (OOM kill, crash) fails the run. A
    superseded task (fenced off) leaves the run alone, and one stopped at shutdown for a resume
    is left to the worker's ``stop_all`` to release (``scale_in``).
    """
    if held.fenced_because is not None:
        records.record_fence(instance, worker_id, held)
        return False
    if held.handed_over and scale_in.awaits_resume(instance, held.run_id):
        return False
    run = instance.get_run_by_id(held.run_id)
    if run is None or held.step_key is not None:
        if run is not None and held.step_key is not None and pool_slots.past_its_executor(run):
            pool_slots.free_step(instance, run.run_id, held.step_key)
        return held.cancel and held.stop_started_at is not None and not held.before_start
    if not held.cancel and run.status != DagsterRunStatus.SUCCESS:
        held.cancel = is_cancelled(run.status) or cancel_recorded(instance, run.run_id)
    if held.cancel and run.status == DagsterRunStatus.FAILURE:
        instance.report_run_canceled(
            run,
            message=(
                f"Worker {worker_id}: the run process failed the run after its cancel "
                "interrupted it; recording CANCELED, as the cancel asked."
            ),
        )
    if not held.cancel:
        if not run.is_finished:
            # Slots first: a retried settle finds the run FAILURE and writes nothing again.
            free_run_slots(instance, run)
            instance.report_run_failed(
                run,
                f"Run process on worker {worker_id} exited with code {returncode} "
                "before the run finished.",
            )
        return False
    if not run.is_finished and run.status != DagsterRunStatus.CANCELING:
        reassert_cancel(instance, worker_id, run)
    if not run.is_finished:
        record_canceled(
            instance,
            run.run_id,
            worker_id,
            what_stopped(held.task_id, returncode, held.before_start, held.killed),
            {"task_id": held.task_id, "exit_code": returncode},
        )
    free_run_slots(instance, run)
    return (
        held.stop_started_at is not None
        and not held.before_start
        and run.status != DagsterRunStatus.SUCCESS
    )


def free_run_slots(instance: DagsterInstance, run: DagsterRun) -> None:
    """The pool slots of a run whose process is gone; of a ``taskiq_executor`` run only those of
    steps never sent, as each step task frees its own when its processes are gone."""
    if keys.sends_steps(instance, run):
        pool_slots.free_unsent(instance, run.run_id)
    else:
        pool_slots.free_run(instance, run.run_id)


def reassert_cancel(instance: DagsterInstance, worker_id: str, run: DagsterRun) -> None:
    instance.report_run_canceling(
        run,
        message=(
            f"Worker {worker_id}: the cancel recorded earlier was overwritten when Dagster "
            "started the run (RUN_START); recording CANCELING again so that the run stops and "
            "ends CANCELED."
        ),
    )


def reassert_if_overwritten(instance: DagsterInstance, worker_id: str, run_id: str) -> bool:
    """For a run just seen STARTED: True if its log holds a cancel (re-recorded now)."""
    if not cancel_recorded(instance, run_id):
        return False
    run = instance.get_run_by_id(run_id)
    if run is None or run.is_finished:
        return False
    if run.status != DagsterRunStatus.CANCELING:
        reassert_cancel(instance, worker_id, run)
    return True


def cancel_released(instance: DagsterInstance, worker_id: str, held: HeldTask) -> bool:
    """A fenced run task's run, cancelled after it was released: CANCELED now (True), as its
    process is gone and nothing else would end it; False if it is no longer CANCELING."""
    what = (
        f"the run process of task {held.task_id} was killed earlier, as the worker "
        f"{held.fenced_because}, and the run released"
    )
    metadata = {"task_id": held.task_id, "exit_code": held.returncode}
    return record_canceled(instance, held.run_id, worker_id, what, metadata)
