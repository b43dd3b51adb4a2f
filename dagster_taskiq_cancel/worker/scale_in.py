"""Scale-in: what a worker that stops for good does with the runs it still holds.

Its drain ran out (SIGTERM) or one of its loops died. Nobody cancelled those runs, so they never
end CANCELED. When Dagster's run monitoring would resume a run (``run_will_resume``: enabled,
attempts left), its run process is stopped with the run left STARTED and, once every process
of the task is gone and the worker's last main-queue poll has answered, the run is marked
released: the launcher's health check then reports the worker FAILED at run monitoring's next
iteration, which resumes the run on another worker (rather than a heartbeat timeout later).
Otherwise the run is failed before the stop, with a message that names the worker, so that the
failure does not read as an unexplained interrupt.
"""

from __future__ import annotations

from dagster import DagsterInstance, DagsterRunStatus

from dagster_taskiq_cancel import claims
from dagster_taskiq_cancel.worker import records


def record_leaving(
    instance: DagsterInstance,
    worker_id: str,
    run_id: str,
    task_id: str,
    step_key: str | None,
    why: str,
) -> bool:
    """Before the stop: say why the task stops; fail its run unless it will be resumed.

    Returns True when the run is left for run monitoring to resume (``release`` it once
    stopped). A step task only gets the event: its step process records its failure itself.
    """
    run = instance.get_run_by_id(run_id)
    if run is None or run.is_finished:
        return False
    leaving = f"Worker {worker_id} is shutting down and {why}: stopping task {task_id}"
    if step_key is not None or run.status != DagsterRunStatus.STARTED:
        instance.report_engine_event(f"{leaving}.", run, step_key=step_key)
        return False
    latest = claims.sent_of(instance, run_id)
    if latest is None or latest.task_id != task_id:
        return False  # resumed elsewhere: the fencing check stops this copy
    if instance.run_will_resume(run_id):
        instance.report_engine_event(
            f"{leaving}; run monitoring will resume the run on another worker.", run
        )
        return True
    instance.report_run_failed(
        run,
        f"{leaving}. The run fails: the worker was stopped while it ran, nobody cancelled it, "
        "and run monitoring will not resume it (run_monitoring.max_resume_run_attempts).",
    )
    return False


def awaits_resume(instance: DagsterInstance, run_id: str) -> bool:
    """After the stop: whether the run still waits to be released for its resume.

    False when a cancel landed during the stop or the run finished: the worker then settles it
    as any other.
    """
    run = instance.get_run_by_id(run_id)
    return run is None or run.status == DagsterRunStatus.STARTED


def release(instance: DagsterInstance, worker_id: str, run_id: str, task_id: str) -> None:
    """Mark the run released, once the task's processes are gone and this worker receives no
    more tasks (a resume sent to its last poll would wait out the visibility timeout)."""
    run = instance.get_run_by_id(run_id)
    if run is None or run.status != DagsterRunStatus.STARTED:
        return
    records.release(instance, worker_id, run_id, task_id)
