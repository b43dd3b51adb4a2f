"""Run monitoring resumes a run whose worker was lost, on another worker; Terminate still works.

The real path: worker A is SIGKILLed while it runs two runs, its heartbeat goes stale, Dagster's
own run-monitoring iteration calls the launcher's ``resume_run``, and worker B runs
`dagster api resume_run` for each.
"""

from __future__ import annotations

import logging
from pathlib import Path

from dagster import DagsterEventType, DagsterRunStatus
from dagster._core.workspace.context import WorkspaceProcessContext
from dagster._core.workspace.load_target import EmptyWorkspaceTarget
from dagster._daemon.monitoring.run_monitoring import execute_run_monitoring_iteration

from dagster_taskiq_cancel import claims
from dagster_taskiq_cancel.local_sqs import LocalSqsServer
from dagster_taskiq_cancel.tasks import resume_task_id
from dagster_taskiq_cancel_tests.jobs import sleepy_job
from dagster_taskiq_cancel_tests.stack import MOTO_ONLY, Deployment, pid_alive, wait_for, worker_pid

pytestmark = MOTO_ONLY

STARTED = DagsterRunStatus.STARTED


def test_lost_worker_run_resumes_on_another_worker_and_can_be_terminated(
    tmp_path: Path, sqs_server: LocalSqsServer
) -> None:
    with Deployment(
        tmp_path,
        sqs_server.endpoint_url,
        instance_config={"run_monitoring": {"enabled": True, "max_resume_run_attempts": 2}},
        heartbeat_timeout_seconds=3,
    ) as deployment:
        lost = deployment.start_worker("--concurrency", "2")
        finishes = deployment.launch(sleepy_job, seconds=6)
        terminated = deployment.launch(sleepy_job, seconds=300)
        first_pids = {run_id: deployment.op_pid(run_id) for run_id in (finishes, terminated)}
        for run_id in first_pids:
            deployment.wait_status(run_id, {STARTED})
            (deployment.markers / f"{run_id}.pid").unlink()  # the resumed op writes a new one
        lost.kill()
        lost.wait(30)
        for pid in first_pids.values():
            wait_for(lambda pid=pid: not pid_alive(pid), 30, f"op pid {pid} gone with its worker")
        assert {deployment.status(run_id) for run_id in first_pids} == {STARTED}
        survivor = deployment.start_worker("--concurrency", "2")

        with WorkspaceProcessContext(deployment.instance, EmptyWorkspaceTarget()) as context:

            def resumed() -> bool:
                list(execute_run_monitoring_iteration(context, logging.getLogger("monitoring")))
                return all(
                    "Resuming run" in " ".join(deployment.engine_messages(run_id))
                    for run_id in first_pids
                )

            wait_for(resumed, 60, "run monitoring to resume both runs", interval=0.5)

        for run_id in first_pids:
            resume = resume_task_id(run_id, 1)
            claim = wait_for(
                lambda r=resume: claims.claim_of(deployment.instance, r), 60, f"{resume} claimed"
            )
            assert worker_pid(claim.worker_id) == survivor.pid
        deployment.wait_status(finishes, {DagsterRunStatus.SUCCESS}, timeout=90)
        assert deployment.executions(finishes) == 2  # once on each worker

        resumed_pid = deployment.op_pid(terminated)
        assert resumed_pid != first_pids[terminated]
        assert deployment.instance.run_launcher.terminate(terminated)
        wait_for(lambda: not pid_alive(resumed_pid), 15, "the resumed run's op gone")
        deployment.wait_status(terminated, {DagsterRunStatus.CANCELED}, timeout=30)
        resumes = deployment.instance.get_records_for_run(
            terminated, of_type=DagsterEventType.ENGINE_EVENT
        ).records
        assert (
            sum(
                (r.event_log_entry.dagster_event.message or "")
                == "Launching a new run worker to resume run"
                for r in resumes
                if r.event_log_entry.dagster_event is not None
            )
            == 1
        ), "resumed once, not again after the terminate"
