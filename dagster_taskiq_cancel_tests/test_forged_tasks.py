"""Only the launcher and the executor can make a worker run code: forged tasks run nothing.

Anyone with SendMessage on the main queue can write any body. Each forgery below is a task that
an attacker could send; the worker must set it aside or drop it, start no child process and
leave every run as it was. The first is the step task of earlier releases, whose Dagster
arguments (instance ref, job origin, step selection) came from the message itself.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from dagster import DagsterEvent, DagsterEventType, DagsterRunStatus
from dagster._core.code_pointer import CustomPointer, ModuleCodePointer
from dagster._core.origin import JobPythonOrigin, RepositoryPythonOrigin
from dagster._grpc.types import ExecuteStepArgs
from dagster._serdes import ConfigurableClassData, serialize_value

from dagster_taskiq_cancel import claims
from dagster_taskiq_cancel.tasks import (
    EXECUTE_STEP,
    resume_task_message,
    run_task_message,
    step_task_id,
    step_task_message,
)
from dagster_taskiq_cancel_tests.jobs import sleepy_job
from dagster_taskiq_cancel_tests.stack import MOTO_ONLY, Deployment, wait_for

pytestmark = MOTO_ONLY


def _with(body: str, **changes: Any) -> str:
    data = json.loads(body)
    for key, value in changes.items():
        if key.startswith("kw_"):
            data["kwargs"][key[3:]] = value
        elif key.startswith("label_"):
            data["labels"][key[6:]] = value
        else:
            data[key] = value
    return json.dumps(data)


def _evil_step_args(deployment: Deployment, run_id: str) -> str:
    """Dagster step arguments that import ``evil`` in the child: an instance ref whose run
    storage class is the attacker's module, a custom job pointer, every step, no verify."""
    evil = ConfigurableClassData("dagster_taskiq_cancel_tests.evil", "Evil", "{}")
    ref = deployment.instance.get_ref()._replace(storage_data=evil, run_storage_data=evil)
    pointer = CustomPointer(
        ModuleCodePointer("dagster_taskiq_cancel_tests.evil", "x", None), [], []
    )
    origin = JobPythonOrigin(
        "sleepy_job", RepositoryPythonOrigin(executable_path="python", code_pointer=pointer)
    )
    args = ExecuteStepArgs(
        job_origin=origin,
        run_id=run_id,
        step_keys_to_execute=None,
        instance_ref=ref,
        should_verify_step=False,
    )
    return serialize_value(args)


def test_forged_tasks_run_nothing(deployment: Deployment) -> None:
    proc = deployment.start_worker()
    # A run nobody launched (NOT_STARTED, no task sent) and a run under way (STARTED) whose
    # executor never launched the steps named below.
    idle = deployment.create_run(sleepy_job, seconds=0)
    started = deployment.create_run(sleepy_job, seconds=0)
    event = DagsterEvent(DagsterEventType.RUN_START.value, job_name=started.job_name)
    deployment.instance.report_dagster_event(event, started.run_id)
    claims.record_sent(deployment.instance, started.run_id, started.run_id)
    step = "sleeper"
    real_step = step_task_message(started.run_id, step, 0).body
    forged = {
        "step task of old releases, with Dagster arguments": _with(
            real_step,
            kwargs={
                "run_id": started.run_id,
                "step_key": step,
                "execute_step_args": _evil_step_args(deployment, started.run_id),
            },
        ),
        "step the executor never launched": real_step,
        "retry attempt nobody launched": step_task_message(started.run_id, step, 3).body,
        "step of a run that has not started": step_task_message(idle.run_id, step, 0).body,
        "step task id of another step": _with(
            real_step, task_id=step_task_id(started.run_id, "other", 0)
        ),
        "negative attempt": _with(real_step, kw_attempt="-1", task_id=f"{started.run_id}:x"),
        "non-ASCII digits": _with(real_step, kw_attempt="\u0663"),
        "run task for a run never launched": run_task_message(idle.run_id).body,
        "run task under another id": _with(run_task_message(idle.run_id).body, task_id="x"),
        "resume nobody sent": resume_task_message(started.run_id, 1).body,
        "resume attempt 0": resume_task_message(started.run_id, 0).body,
        "non-string label": _with(real_step, label_mac=["a"]),
        "unknown task kwargs": _with(real_step, task_name=EXECUTE_STEP, kw_extra="1"),
    }
    names = deployment.queues.names
    for body in forged.values():
        deployment.queues.send(names.main, body, "forged", uuid.uuid4().hex)
    wait_for(deployment.queue_empty, 60, "every forged task taken off the queue")
    wait_for(
        lambda: (
            deployment.worker_log(0).count("Dropping task")
            + deployment.worker_log(0).count("Deleting malformed task")
            >= len(forged)
        ),
        30,
        "every forgery logged",
    )
    log = deployment.worker_log(0)
    assert "Started task" not in log, log
    assert not (deployment.root / "evil-ran").exists(), "the attacker's module ran"
    assert deployment.status(idle.run_id) == DagsterRunStatus.NOT_STARTED
    assert deployment.status(started.run_id) == DagsterRunStatus.STARTED
    assert deployment.executions(idle.run_id) == deployment.executions(started.run_id) == 0
    assert proc.poll() is None

    # A real launch still runs, on the same worker.
    run_id = deployment.launch(sleepy_job, seconds=0)
    deployment.wait_status(run_id, {DagsterRunStatus.SUCCESS}, timeout=120)
