"""Scale-in: a worker stopped with SIGTERM drains, then hands its runs on or fails them.

With run monitoring's resume on, the drained worker's run resumes on another worker (at the
next monitoring iteration, not a heartbeat timeout later) and succeeds; with it off, the run
fails and says which worker was stopped. Nobody asked to cancel: it never ends CANCELED.
"""

from __future__ import annotations

from pathlib import Path

from dagster import DagsterEventType, DagsterRunStatus

from dagster_taskiq_cancel import claims
from dagster_taskiq_cancel.local_sqs import LocalSqsServer
from dagster_taskiq_cancel.tasks import WORKER_ID_TAG, resume_task_id
from dagster_taskiq_cancel_tests.jobs import slow_first_job
from dagster_taskiq_cancel_tests.resume_jobs import (
    go_file,
    prep_executions,
    prep_work_config,
    prep_work_job,
    prep_work_step_job,
)
from dagster_taskiq_cancel_tests.stack import (
    MOTO_ONLY,
    Deployment,
    monitor_until,
    pid_alive,
    stop_process,
    wait_for,
    worker_pid,
)

pytestmark = MOTO_ONLY

RESUME = {"enabled": True, "max_resume_run_attempts": 3, "poll_interval_seconds": 1}
# Far above the test's waits: a resume must not wait for the drained worker's heartbeat to age.
HEARTBEAT_TIMEOUT = 120


def _drain_holder(deployment: Deployment, run_id: str, successors: int) -> str:
    """Start the run's worker, then ``successors`` more; SIGTERM the first once the run's op
    runs; the drained worker's id once it exited."""
    holder = deployment.start_worker()
    worker_id = wait_for(lambda: deployment.tags(run_id).get(WORKER_ID_TAG), 60, "the claim")
    assert worker_pid(worker_id) == holder.pid
    for _ in range(successors):  # while the run process starts: it holds the run already
        deployment.start_worker()
    pid = deployment.op_pid(run_id)
    deployment.wait_status(run_id, {DagsterRunStatus.STARTED})
    # A worker that hands a run over waits for its last main-queue poll (up to its wait time),
    # so that the resume is not delivered to it: give it that on top of drain and grace.
    s = deployment.settings
    stop_process(holder, timeout=s.drain_seconds + s.grace_seconds + s.wait_time_seconds + 15)
    assert holder.returncode == 0, deployment.worker_log(0)
    assert not pid_alive(pid), "the drained worker's run process is gone"
    return worker_id


def _never_cancelled(deployment: Deployment, run_id: str) -> None:
    cancels = {DagsterEventType.RUN_CANCELING, DagsterEventType.RUN_CANCELED}
    assert not deployment.instance.get_records_for_run(run_id, of_type=cancels).records


def test_a_drained_workers_run_resumes_on_another_worker_and_succeeds(
    tmp_path: Path, sqs_server: LocalSqsServer
) -> None:
    with Deployment(
        tmp_path,
        sqs_server.endpoint_url,
        instance_config={"run_monitoring": RESUME},
        heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT,
    ) as deployment:
        run_id = deployment.launch(slow_first_job, seconds=300)
        drained = _drain_holder(deployment, run_id, successors=1)
        assert deployment.status(run_id) == DagsterRunStatus.STARTED, "left for the resume"
        monitor_until(
            deployment,
            lambda: any("Resuming run" in m for m in deployment.engine_messages(run_id)),
            30,
            "run monitoring to resume the run",
        )
        resume = resume_task_id(run_id, 1)
        claim = wait_for(
            lambda: claims.claim_of(deployment.instance, resume), 60, f"{resume} claimed"
        )
        assert claim.worker_id != drained
        assert worker_pid(claim.worker_id) == deployment.workers[1].pid
        deployment.wait_status(run_id, {DagsterRunStatus.SUCCESS}, timeout=60)
        assert deployment.executions(run_id) == 2  # interrupted once, then done on the other
        assert any(drained in m and "resume" in m for m in deployment.engine_messages(run_id)), (
            "the run's log says which worker handed it on"
        )
        _never_cancelled(deployment, run_id)


def test_without_resume_a_drained_workers_run_fails_naming_the_worker(
    deployment: Deployment,
) -> None:
    run_id = deployment.launch(slow_first_job, seconds=300)
    drained = _drain_holder(deployment, run_id, successors=0)
    deployment.wait_status(run_id, {DagsterRunStatus.FAILURE}, timeout=30)
    failures = deployment.instance.get_records_for_run(
        run_id, of_type=DagsterEventType.RUN_FAILURE
    ).records
    assert len(failures) == 1
    event = failures[0].event_log_entry.dagster_event
    assert event is not None and drained in (event.message or ""), event
    assert "stopped" in (event.message or "")
    _never_cancelled(deployment, run_id)


def _resume_once(tmp_path: Path, sqs_server: LocalSqsServer) -> Deployment:
    """A deployment whose runs Dagster's run monitoring resumes once (the issue's setting)."""
    return Deployment(
        tmp_path,
        sqs_server.endpoint_url,
        instance_config={"run_monitoring": {**RESUME, "max_resume_run_attempts": 1}},
        heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT,
    )


def test_a_resumed_multiprocess_run_runs_only_its_unfinished_steps(
    tmp_path: Path, sqs_server: LocalSqsServer
) -> None:
    """``prep`` succeeded before the hand-over: the resume runs ``work`` again, not ``prep``."""
    deployment = _resume_once(tmp_path, sqs_server)
    try:
        config = prep_work_config(deployment.markers, seconds=300)
        run_id = deployment.launch(prep_work_job, run_config=config)
        _drain_holder(deployment, run_id, successors=1)
        assert prep_executions(deployment.markers, run_id) == 1
        monitor_until(
            deployment,
            lambda: (
                deployment.status(run_id) in {DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE}
            ),
            120,
            "the resumed run to end",
        )
        assert deployment.status(run_id) == DagsterRunStatus.SUCCESS
        assert deployment.executions(run_id) == 2  # work: interrupted once, then done
        assert prep_executions(deployment.markers, run_id) == 1, "prep ran again"
        assert any(
            "finished steps are not run again (prep)" in m
            for m in deployment.engine_messages(run_id)
        )
        _never_cancelled(deployment, run_id)
    finally:
        deployment.stop()


def test_a_resumed_step_run_runs_only_its_unfinished_steps(
    tmp_path: Path, sqs_server: LocalSqsServer
) -> None:
    """Under ``taskiq_executor`` Dagster's own resume skips what finished: the run task's worker
    is drained while ``work`` runs on another worker; the resumed run waits for that step, which
    runs once, and does not run ``prep`` again."""
    deployment = _resume_once(tmp_path, sqs_server)
    try:
        config = prep_work_config(deployment.markers, seconds=300)
        run_id = deployment.launch(prep_work_step_job, run_config=config)
        holder = deployment.start_worker("--concurrency", "1")  # the run task, no step
        wait_for(lambda: deployment.tags(run_id).get(WORKER_ID_TAG), 60, "the claim")
        deployment.start_worker("--concurrency", "2")  # the steps, then the resume
        step_pid = deployment.op_pid(run_id)
        s = deployment.settings
        stop_process(holder, timeout=s.drain_seconds + s.grace_seconds + s.wait_time_seconds + 15)
        assert holder.returncode == 0, deployment.worker_log(0)
        monitor_until(
            deployment,
            lambda: any("in-progress step work" in m for m in deployment.engine_messages(run_id)),
            90,
            "the resumed run to check on work",
        )
        assert pid_alive(step_pid), "the handed-on run's step kept running"
        go_file(deployment.markers, run_id).touch()
        deployment.wait_status(run_id, {DagsterRunStatus.SUCCESS}, timeout=90)
        assert prep_executions(deployment.markers, run_id) == 1, "prep ran again"
        assert deployment.executions(run_id) == 1, "work ran again"
        _never_cancelled(deployment, run_id)
    finally:
        deployment.stop()
