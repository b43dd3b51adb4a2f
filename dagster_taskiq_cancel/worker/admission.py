"""Whether a task may run on this worker, and with what: the checks between dequeue and spawn.

A task names ids only, and its sender may be anyone who can write to the queue. A run task runs
only if the launcher sent it (the run's ``task_id`` tag names it) and the run can start; a step
task only if its run's executor recorded launching this very task. Every argument of the child
comes from the run storage and the worker's own instance (``step_args``). Of concurrent copies
of one task, the claim lets exactly one worker run it.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from dagster import DagsterEventType, DagsterInstance, DagsterRun, DagsterRunStatus
from dagster._grpc.types import ExecuteRunArgs, ResumeRunArgs
from dagster._serdes import serialize_value

from dagster_taskiq_cancel import metrics
from dagster_taskiq_cancel.cooperative import CANCEL_FILE_ENV
from dagster_taskiq_cancel.tasks import TASK_ID_TAG, WORKER_ID_TAG, claim_tag
from dagster_taskiq_cancel.worker import children, keys
from dagster_taskiq_cancel.worker.authority import RUN_STARTABLE, has_ended, is_cancelled
from dagster_taskiq_cancel.worker.step_args import step_args, was_launched

logger = logging.getLogger(__name__)

_CLAIM_EVENT = "Run task claimed by"


@dataclass(frozen=True)
class Admitted:
    """A task cleared to run: its run as read, and its child's command line and environment."""

    run: DagsterRun
    argv: list[str]
    env: dict[str, str]

    @property
    def cancel_file(self) -> Path:
        return Path(self.env[CANCEL_FILE_ENV])


@dataclass(frozen=True)
class Gate:
    """The worker's side of admission: who claims, with which instance, where deadlines go."""

    instance: DagsterInstance
    worker_id: str
    cancel_dir: Path

    def admit(
        self, task_id: str, run_id: str, step_key: str | None, attempt: int, resume: bool
    ) -> Admitted | DagsterRunStatus | None:
        """The task cleared to run; else the status of a cancelled run (to ack as skipped), or
        None when the task must not run (logged with why)."""
        run = self.instance.get_run_by_id(run_id)
        if run is None:
            logger.warning("Dropping task %s: run %s does not exist", task_id, run_id)
            return None
        if is_cancelled(run.status):
            logger.info("Skipping task %s: run %s is %s", task_id, run_id, run.status.value)
            return run.status
        if has_ended(run.status):
            logger.info(
                "Dropping task %s: run %s already ended %s", task_id, run_id, run.status.value
            )
            return None
        if step_key is not None:
            return self._admit_step(run, task_id, step_key, attempt)
        if run.tags.get(TASK_ID_TAG) != task_id:
            logger.warning(
                "Dropping task %s: run %s was not sent as this task (%s)",
                task_id,
                run_id,
                run.tags.get(TASK_ID_TAG),
            )
            return None
        startable = {DagsterRunStatus.STARTED} if resume else RUN_STARTABLE
        if run.status not in startable or not self.claim(run, task_id):
            logger.info("Dropping task %s: run %s already started elsewhere", task_id, run_id)
            return None
        args_type = ResumeRunArgs if resume else ExecuteRunArgs
        run_args = args_type(
            job_origin=run.job_code_origin,  # type: ignore[arg-type]
            run_id=run_id,
            instance_ref=self.instance.get_ref(),
            set_exit_code_on_failure=True,
        )
        command = "resume_run" if resume else "execute_run"
        argv = children.dagster_api_argv(command, serialize_value(run_args))
        return Admitted(run, argv, self.child_env({}, keys.sends_steps(self.instance, run)))

    def _admit_step(
        self, run: DagsterRun, task_id: str, step_key: str, attempt: int
    ) -> Admitted | None:
        if run.status != DagsterRunStatus.STARTED or not was_launched(
            self.instance, run.run_id, step_key, task_id
        ):
            logger.warning(
                "Dropping task %s: run %s (%s) has no record of launching it",
                task_id,
                run.run_id,
                run.status.value,
            )
            return None
        if not self.claim(run, task_id):
            logger.info("Dropping task %s: another worker claimed it", task_id)
            return None
        args = step_args(self.instance, run, step_key, attempt)
        # Dagster's own way to pass them: an env var (the k8s shape), not the command line.
        env = {e["name"]: e["value"] for e in args.get_command_env()}
        return Admitted(run, children.dagster_api_argv("execute_step"), self.child_env(env))

    def child_env(self, extra: Mapping[str, str], keep_keys: bool = False) -> dict[str, str]:
        """The worker's environment for a child, with its own cancel deadline file; the signing
        keys only if it sends step tasks (``keys``)."""
        cancel_file = self.cancel_dir / f"{uuid.uuid4().hex}.deadline"
        env = metrics.child_env({**os.environ, **extra, CANCEL_FILE_ENV: str(cancel_file)})
        return keys.child_env(env, keep_keys)

    def claim(self, run: DagsterRun, task_id: str) -> bool:
        """Claim a task for this worker; of concurrent claims, the first in the event log wins.

        A tag written and read back is not enough: two workers that receive copies of the task
        at the same moment both write the tag and may each read back their own. The event log
        orders entries by storage id, so every claimer agrees on which claim came first. Each
        resume attempt and each step attempt is a task of its own, with its own claim; only a
        run or resume claim makes this worker the run's holder (``WORKER_ID_TAG``). ``run`` is
        the record ``admit`` has just read.
        """
        run_id = run.run_id
        token = f"{self.worker_id}/{uuid.uuid4().hex}"
        tag = claim_tag(run_id, task_id)
        event = _CLAIM_EVENT if task_id == run_id else f"Task {task_id} claimed by"
        if tag in run.tags:
            return False
        self.instance.report_engine_event(f"{event} {token}.", run)
        events = self.instance.get_records_for_run(
            run_id, of_type=DagsterEventType.ENGINE_EVENT, ascending=True
        ).records
        messages = (
            record.event_log_entry.dagster_event.message or ""
            for record in events
            if record.event_log_entry.dagster_event is not None
        )
        # A default, not StopIteration: raised in the storage thread, it would hang the await.
        if token not in next((m for m in messages if m.startswith(f"{event} ")), ""):
            return False
        holder = {} if run.tags.get(TASK_ID_TAG) != task_id else {WORKER_ID_TAG: self.worker_id}
        self.instance.add_run_tags(run_id, {tag: token, **holder})
        return True
