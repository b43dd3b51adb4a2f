"""With a signing key, forged and unsigned cancel messages are rejected; signed ones work."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from dagster import DagsterRunStatus

from dagster_taskiq_cancel.local_sqs import LOCAL_CREDENTIALS, LocalSqsServer
from dagster_taskiq_cancel.messages import CancelRequest, Codec
from dagster_taskiq_cancel_tests.jobs import sleepy_job
from dagster_taskiq_cancel_tests.key_jobs import keys_job, seen_keys, step_keys_job
from dagster_taskiq_cancel_tests.stack import MOTO_ONLY, Deployment, pid_alive, wait_for


def test_signed_deployment_rejects_forgeries_and_still_cancels(
    tmp_path: Path, sqs_server: LocalSqsServer
) -> None:
    with Deployment(tmp_path, sqs_server.endpoint_url, signing_key="team-secret") as deployment:
        deployment.start_worker()
        run_id = deployment.launch(sleepy_job, seconds=300)
        pid = deployment.op_pid(run_id)
        deployment.wait_status(run_id, {DagsterRunStatus.STARTED})
        cancels = deployment.queues.names.cancels
        forged = Codec("wrong-key").dumps(CancelRequest(run_id=run_id))
        deployment.queues.send(cancels, forged, run_id, "forged")
        deployment.queues.send(cancels, CancelRequest(run_id=run_id).to_json(), run_id, "plain")
        wait_for(lambda: "2 rejected so far" in deployment.worker_log(0), 30, "two rejections")
        assert "team-secret" not in deployment.worker_log(0)
        assert "signing_key is written in dagster.yaml" in deployment.worker_log(0)
        assert pid_alive(pid), "a rejected message never stops anything"
        assert deployment.instance.run_launcher.terminate(run_id)
        wait_for(lambda: not pid_alive(pid), 15, "the signed cancel stops the run")
        deployment.wait_status(run_id, {DagsterRunStatus.CANCELED}, timeout=30)
        assert "rejected" not in deployment.worker_log(0).split("2 rejected so far", 1)[1]


@MOTO_ONLY  # the subject is the worker's children, not the SQS server
def test_only_a_run_process_that_sends_steps_gets_the_keys(
    tmp_path: Path, sqs_server: LocalSqsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keys in the environment (rotating: two of them) reach the run process of a
    ``taskiq_executor`` run, which signs its step tasks, and no op: neither in the run process
    of a run on Dagster's own executor, nor in a step process. The endpoint is named as a
    remote one would be, so that it needs the keys; with resume on, every child builds the
    launcher (from its settings) as it loads the instance, keys or none."""
    alias = socket.gethostname()
    if socket.gethostbyname(alias) != "127.0.0.1":
        pytest.skip(f"this host's name {alias} does not resolve to 127.0.0.1")
    monkeypatch.setenv("DAGSTER_TASKIQ_SIGNING_KEYS", "new-key,old-key")
    for name, value in LOCAL_CREDENTIALS.items():  # not local by name: no dummy credentials
        monkeypatch.setenv(name, value)
    endpoint = sqs_server.endpoint_url.replace("127.0.0.1", alias)
    resume = {"run_monitoring": {"enabled": True, "max_resume_run_attempts": 1}}
    with Deployment(tmp_path, endpoint, instance_config=resume) as deployment:
        deployment.start_worker()
        config = {"ops": {"note_keys": {"config": {"marker_dir": str(deployment.markers)}}}}
        runs = [deployment.launch(job, run_config=config) for job in (keys_job, step_keys_job)]
        for run_id in runs:
            deployment.wait_status(
                run_id, {DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE}, 180
            )
            assert deployment.status(run_id) == DagsterRunStatus.SUCCESS, "children load"
            assert seen_keys(deployment.markers, run_id) == ["-"], "no op sees a key"
        assert "rejected" not in deployment.worker_log(0), "the step task was signed"
