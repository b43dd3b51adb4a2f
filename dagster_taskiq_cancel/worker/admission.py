"""Whether a task may run on this worker, and with what: the checks between dequeue and spawn.

A task names ids only, and its sender may be anyone who can write to the queue. A run task runs
only if the launcher sent it last (``claims.sent``, never a tag), to the queue it came from, and
the run can start; a step task only if its run's executor recorded launching this very task to
that queue (``claims.launch_of``: one row, whatever the run's size; a step sent by a run process
of a release before launch records has none, and is dropped). Every argument of the child
comes from the run storage and the worker's own instance (``step_args``). Of concurrent copies
of one task, the claim (``claims``) lets exactly one worker run it.

Work is failed only by the worker that claimed it: an error before the claim raises
``NotClaimed``, and the worker hands the task back to the queue for another try.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from dagster import DagsterInstance, DagsterRun, DagsterRunStatus
from dagster._grpc.types import ExecuteRunArgs, ResumeRunArgs
from dagster._serdes import serialize_value

from dagster_taskiq_cancel import claims, metrics
from dagster_taskiq_cancel.claims import Launch
from dagster_taskiq_cancel.cooperative import CANCEL_FILE_ENV
from dagster_taskiq_cancel.tasks import (
    TASK_ID_TAG,
    WORKER_ID_TAG,
    step_holder_tag,
    step_task_id,
)
from dagster_taskiq_cancel.worker import children, keys, pool_slots
from dagster_taskiq_cancel.worker.authority import RUN_STARTABLE, has_ended, is_cancelled
from dagster_taskiq_cancel.worker.step_args import step_args

logger = logging.getLogger(__name__)


class NotClaimed(Exception):
    """Admission failed before this worker claimed the task: the task is not this worker's to
    fail, and goes back to the queue."""


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
        self,
        task_id: str,
        run_id: str,
        step_key: str | None,
        attempt: int,
        resume: bool,
        queue: str | None = None,
    ) -> Admitted | DagsterRunStatus | None:
        """The task cleared to run; else the status of a cancelled run (to ack as skipped), or
        None when the task must not run (logged with why). Raises ``NotClaimed`` for an error
        before the claim; any later error is the claimer's to record.

        ``queue`` is where the task came from: one its sender routed to another queue is not
        the copy that was sent (a forgery, or a copy moved by hand) and is dropped, so that
        a pool's work never runs on another pool's workers; the copy sent runs where it went.
        """
        try:
            decided = self._claim(task_id, run_id, step_key, attempt, resume, queue)
        except Exception as exc:
            raise NotClaimed(f"{type(exc).__name__}: {exc}") from exc
        if decided is None or isinstance(decided, DagsterRunStatus):
            return decided
        run, launch = decided
        self._show(run, task_id, step_key)
        if launch is not None:
            args = step_args(self.instance, run, step_key, launch)
            # Dagster's own way to pass them: an env var (the k8s shape), not the command line.
            env = {e["name"]: e["value"] for e in args.get_command_env()}
            return Admitted(run, children.dagster_api_argv("execute_step"), self.child_env(env))
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

    def _claim(
        self,
        task_id: str,
        run_id: str,
        step_key: str | None,
        attempt: int,
        resume: bool,
        queue: str | None,
    ) -> tuple[DagsterRun, Launch | None] | DagsterRunStatus | None:
        """The run (and a step task's launch record), once this worker claimed the task; else
        what ``admit`` answers."""
        run = self.instance.get_run_by_id(run_id)
        if run is None:
            logger.warning("Dropping task %s: run %s does not exist", task_id, run_id)
            return None
        if is_cancelled(run.status):
            logger.info("Skipping task %s: run %s is %s", task_id, run_id, run.status.value)
            if step_key is not None:
                pool_slots.free_unclaimed_step(self.instance, run_id, step_key, task_id)
            return run.status
        if has_ended(run.status):
            logger.info(
                "Dropping task %s: run %s already ended %s", task_id, run_id, run.status.value
            )
            return None
        if step_key is not None:
            launch = None
            if run.status == DagsterRunStatus.STARTED and task_id == step_task_id(
                run_id, step_key, attempt
            ):
                launch = claims.launch_of(self.instance, task_id)
            if launch is None:
                logger.warning(
                    "Dropping task %s: run %s (%s) has no record of launching it",
                    task_id,
                    run_id,
                    run.status.value,
                )
                return None
            if queue is not None and launch.queue not in (None, queue):
                logger.warning(
                    "Dropping task %s from queue %s: its step was sent to queue %s",
                    task_id,
                    queue,
                    launch.queue,
                )
                return None
            if not self.claim(task_id):
                logger.info("Dropping task %s: another worker claimed it", task_id)
                return None
            return run, launch
        sent = claims.sent_of(self.instance, run_id)
        if sent is None or sent.task_id != task_id:
            logger.warning(
                "Dropping task %s: run %s was not sent as this task (%s)",
                task_id,
                run_id,
                sent.task_id if sent else "no task sent",
            )
            return None
        if queue is not None and sent.queue not in (None, queue):
            logger.warning(
                "Dropping task %s from queue %s: run %s was sent to queue %s",
                task_id,
                queue,
                run_id,
                sent.queue,
            )
            return None
        startable = {DagsterRunStatus.STARTED} if resume else RUN_STARTABLE
        if run.status not in startable or not self.claim(task_id):
            logger.info("Dropping task %s: run %s already started elsewhere", task_id, run_id)
            return None
        return run, None

    def claim(self, task_id: str) -> bool:
        """Claim a task for this worker (``claims.claim``: of concurrent claimers, one wins).

        A claim this same worker made before, whose answer was lost with the connection, is
        this worker's still: the task was handed back, and came back here.
        """
        error: Exception | None = None
        try:
            if claims.claim(self.instance, task_id, self.worker_id):
                return True
        except Exception as exc:
            error = exc
        made = claims.claim_of(self.instance, task_id)
        if made is not None and made.worker_id == self.worker_id:
            return True
        if error is not None:
            raise error
        return False

    def _show(self, run: DagsterRun, task_id: str, step_key: str | None) -> None:
        """Tags for people (the UI) and for cancel hints; nothing decides on them, and
        concurrent writers may lose some, so a failure to write them only warns. A worker's step
        holder tag is written once per run: its next step of the run restores it if lost."""
        if step_key is not None:
            tag = step_holder_tag(run.run_id, self.worker_id)
            if tag in run.tags:
                return
            tags = {tag: f"{self.worker_id}/{uuid.uuid4().hex}"}
        else:
            tags = {TASK_ID_TAG: task_id, WORKER_ID_TAG: self.worker_id}
        try:
            self.instance.add_run_tags(run.run_id, tags)
        except Exception as exc:
            logger.warning(
                "Could not tag run %s with its claim of %s: %s", run.run_id, task_id, exc
            )

    def child_env(self, extra: Mapping[str, str], keep_keys: bool = False) -> dict[str, str]:
        """The worker's environment for a child, with its own cancel deadline file; the signing
        keys only if it sends step tasks (``keys``)."""
        cancel_file = self.cancel_dir / f"{uuid.uuid4().hex}.deadline"
        env = metrics.child_env({**os.environ, **extra, CANCEL_FILE_ENV: str(cancel_file)})
        return keys.child_env(env, keep_keys)
