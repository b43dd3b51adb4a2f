"""One fault on a stop path, and the stop still happens (or the run says why it cannot).

Each test injects one fault into a real worker's path (a deadline file it cannot write, a run
tag that asks for an endless stop, an error after the task's message was deleted, a resume that
moved the run elsewhere, a terminate during a resume's start-up) and asserts the outcome a user
sees: the process is gone, and the run's status and events are true.
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

from dagster import DagsterEvent, DagsterEventType, DagsterRunStatus
from dagster._core.launcher import WorkerStatus

from dagster_taskiq_cancel import claims
from dagster_taskiq_cancel.heartbeats import worker_health
from dagster_taskiq_cancel.local_sqs import LocalSqsServer
from dagster_taskiq_cancel.settings import TaskiqCancelSettings
from dagster_taskiq_cancel.tasks import (
    RELEASED_TAG,
    TAG_PREFIX,
    WORKER_ID_TAG,
    resume_task_id,
    resume_task_message,
    run_task_message,
)
from dagster_taskiq_cancel.worker.worker import Worker
from dagster_taskiq_cancel_tests.jobs import sleepy_job
from dagster_taskiq_cancel_tests.stack import MOTO_ONLY, Deployment, pid_alive, wait_for
from dagster_taskiq_cancel_tests.test_sensor import tick_until

pytestmark = MOTO_ONLY

CANCELED = {DagsterRunStatus.CANCELED}


def _cancel_dirs(tmp: Path) -> list[Path]:
    return list(tmp.glob("dagster-taskiq-cancel-*"))


def test_a_deadline_file_that_cannot_be_written_does_not_lose_the_stop(
    deployment: Deployment,
) -> None:
    """The worker's cancel directory vanishes (as on a full or wiped /tmp) before Terminate."""
    tmp = deployment.root / "tmp"
    tmp.mkdir()
    deployment.env["TMPDIR"] = str(tmp)
    deployment.start_worker()
    run_id = deployment.launch(sleepy_job, seconds=300)
    pid = deployment.op_pid(run_id)
    for directory in _cancel_dirs(tmp):
        shutil.rmtree(directory)
    assert deployment.instance.run_launcher.terminate(run_id)
    wait_for(lambda: not pid_alive(pid), 30, "the op stopped although its deadline was lost")
    assert "Could not write the cancel deadline" in deployment.worker_log(0)


def test_stop_times_from_run_tags_are_finite(deployment: Deployment) -> None:
    """``inf`` notice and grace tags would wait forever before the interrupt: they are ignored."""
    deployment.start_worker()
    tags = {f"{TAG_PREFIX}notice_seconds": "inf", f"{TAG_PREFIX}grace_seconds": "1e309"}
    run_id = deployment.launch(sleepy_job, seconds=300, tags=tags)
    pid = deployment.op_pid(run_id)
    deployment.wait_status(run_id, {DagsterRunStatus.STARTED})
    assert deployment.instance.run_launcher.terminate(run_id)
    wait_for(lambda: not pid_alive(pid), 30, "the op stopped despite the tags")
    assert "not a finite number" in deployment.worker_log(0)


def test_an_error_after_the_message_is_deleted_fails_the_run_at_once(
    deployment: Deployment,
) -> None:
    """The task's message is gone once received: an error before the child starts must not
    leave the run STARTING until run monitoring's start timeout."""
    deployment.start_worker()
    config = {"ops": {"sleeper": {"config": {"marker_dir": str(deployment.markers)}}}}
    run = deployment.instance.create_run_for_job(sleepy_job, run_config=config)  # no origin
    event = DagsterEvent(DagsterEventType.RUN_STARTING.value, job_name=run.job_name)
    deployment.instance.report_dagster_event(event, run.run_id)
    claims.record_sent(deployment.instance, run.run_id, run.run_id)
    queues = deployment.queues
    queues.send(queues.names.main, run_task_message(run.run_id).body, run.run_id, run.run_id)
    deployment.wait_status(run.run_id, {DagsterRunStatus.FAILURE}, timeout=30)
    assert any("could not start the task" in m for m in deployment.engine_messages(run.run_id))


def test_each_worker_boot_has_its_own_id(deployment: Deployment) -> None:
    """A restarted worker can have the same pid (PID 1 in a container) and host name."""
    settings = TaskiqCancelSettings(queue_name=deployment.settings.queue_name)
    first, second = Worker(settings, deployment.instance), Worker(settings, deployment.instance)
    try:
        assert first.worker_id != second.worker_id
    finally:
        first.close()
        second.close()


def test_a_run_resumed_elsewhere_is_fenced_off_its_old_holder(deployment: Deployment) -> None:
    """Run monitoring took a stalled worker for dead and sent a resume: the old holder's run
    process must die without writing anything into the run that now lives on elsewhere."""
    deployment.start_worker()
    run_id = deployment.launch(sleepy_job, seconds=300)
    pid = deployment.op_pid(run_id)
    deployment.wait_status(run_id, {DagsterRunStatus.STARTED})
    claims.record_sent(deployment.instance, run_id, resume_task_id(run_id, 1))
    wait_for(lambda: not pid_alive(pid), 30, "the old holder's op killed")
    wait_for(
        lambda: any("a resume" in m for m in deployment.engine_messages(run_id)),
        30,
        "the kill recorded in the run",
    )
    assert deployment.status(run_id) == DagsterRunStatus.STARTED, "left to the resumed run"


def test_terminate_during_a_resume_start_up_ends_canceled(deployment: Deployment) -> None:
    """A STARTED run whose worker was lost is resumed; Terminate lands while `dagster api
    resume_run` is still starting."""
    run = deployment.create_run(sleepy_job, seconds=300)
    run_id = run.run_id
    for kind in (DagsterEventType.RUN_STARTING, DagsterEventType.RUN_START):
        event = DagsterEvent(kind.value, job_name=run.job_name)
        deployment.instance.report_dagster_event(event, run_id)
    claims.record_sent(deployment.instance, run_id, resume_task_id(run_id, 1))
    deployment.start_worker()
    queues = deployment.queues
    queues.send(queues.names.main, resume_task_message(run_id, 1).body, run_id, "resume")
    wait_for(lambda: "-resume-1 (run" in deployment.worker_log(0), 30, "the resume started")
    assert deployment.instance.run_launcher.terminate(run_id)
    tick_until(deployment, lambda: deployment.status(run_id) in CANCELED, timeout=60)


def test_a_worker_that_cannot_beat_kills_its_work_and_releases_the_run(
    tmp_path: Path, sqs_server: LocalSqsServer
) -> None:
    """The run storage stops answering the worker (here: a lock held on sqlite's runs.db). Run
    monitoring would soon resume the run elsewhere, so the worker kills its run process first,
    and once the storage answers again marks the run released so that it is not stuck."""
    with Deployment(tmp_path, sqs_server.endpoint_url, heartbeat_timeout_seconds=3) as deployment:
        deployment.start_worker()
        run_id = deployment.launch(sleepy_job, seconds=300)
        pid = deployment.op_pid(run_id)
        deployment.wait_status(run_id, {DagsterRunStatus.STARTED})
        lock = sqlite3.connect(deployment.home / "history" / "runs.db", timeout=30)
        try:
            lock.execute("BEGIN EXCLUSIVE")
            wait_for(lambda: not pid_alive(pid), 30, "the op killed while the storage is gone")
        finally:
            lock.rollback()
            lock.close()
        holder = deployment.tags(run_id)[WORKER_ID_TAG]
        wait_for(lambda: deployment.tags(run_id).get(RELEASED_TAG) == holder, 30, "released")
        run = deployment.instance.get_run_by_id(run_id)
        assert run is not None and run.status == DagsterRunStatus.STARTED
        health = worker_health(deployment.instance, run, 3)
        assert health.status == WorkerStatus.FAILED, health
        assert any("could not write its heartbeat" in m for m in deployment.engine_messages(run_id))
