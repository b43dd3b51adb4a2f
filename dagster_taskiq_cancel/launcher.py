"""TaskiqRunLauncher: sends runs to their pool's queue and records cancel intent before any
signal."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from dagster import DagsterInstance, DagsterRun
from dagster import _check as check
from dagster._core.events import EngineEventData
from dagster._core.launcher import (
    CheckRunHealthResult,
    LaunchRunContext,
    ResumeRunContext,
    RunLauncher,
)
from dagster._serdes import ConfigurableClass, ConfigurableClassData
from typing_extensions import Self

from dagster_taskiq_cancel import claims
from dagster_taskiq_cancel.cancel import request_cancel, retries_restored, terminate_requester
from dagster_taskiq_cancel.heartbeats import worker_health
from dagster_taskiq_cancel.messages import codec_for
from dagster_taskiq_cancel.queues import SqsError, SyncQueues
from dagster_taskiq_cancel.routing import plan_pool, run_pool, task_queue
from dagster_taskiq_cancel.settings import (
    LAUNCHER_CONFIG,
    TaskiqCancelSettings,
    config_fields,
    settings_from_env,
)
from dagster_taskiq_cancel.tasks import (
    QUEUE_TAG,
    SHOWN_TAGS,
    TASK_ID_TAG,
    TaskMessage,
    resume_task_message,
    run_task_message,
)


class TaskiqRunLauncher(RunLauncher, ConfigurableClass):
    """Launch each run as a taskiq task on SQS; terminate by recording CANCELING, then hinting.

    Built lazily in every process that touches the instance, so ``__init__`` does no I/O.
    """

    def __init__(
        self,
        settings: TaskiqCancelSettings,
        inst_data: ConfigurableClassData | None = None,
    ) -> None:
        self.settings = settings
        self._inst_data = inst_data
        super().__init__()

    @property
    def inst_data(self) -> ConfigurableClassData | None:
        return self._inst_data

    @classmethod
    def config_type(cls) -> dict[str, Any]:
        return config_fields()

    @classmethod
    def from_config_value(
        cls, inst_data: ConfigurableClassData, config_value: Mapping[str, Any]
    ) -> Self:
        settings = settings_from_env(config_value, where=LAUNCHER_CONFIG)
        return cls(settings=settings, inst_data=inst_data)

    def register_instance(self, instance: DagsterInstance) -> None:
        """Fail at once, saying what to change, on a run storage that cannot hold claims."""
        super().register_instance(instance)
        claims.sql_storage(instance)

    @functools.cached_property
    def queues(self) -> SyncQueues:
        return SyncQueues(self.settings)

    def launch_run(self, context: LaunchRunContext) -> None:
        """Send the run's task. Bookkeeping tags the run carries from its parent (a re-execution,
        a run retry) or from its user decide nothing (its task and claim live in ``claims``);
        the shown ones are cleared, so that the UI does not name the parent's worker, and a
        cancelled parent's ``max_retries: 0`` is undone (``retries_restored``)."""
        run = context.dagster_run
        message = run_task_message(run.run_id, codec_for(self.settings))
        inherited = {tag: "" for tag in SHOWN_TAGS if run.tags.get(tag)}
        self._send(run, message, "run", {**inherited, **retries_restored(self._instance, run)})

    @property
    def supports_resume_run(self) -> bool:
        return True

    def resume_run(self, context: ResumeRunContext) -> None:
        """Run monitoring found the run's worker dead: any worker resumes it from its failure.

        The run stays STARTED; the resume task has its own id (run id + attempt), so the worker
        that takes it may claim the run although the lost worker had claimed it before.
        """
        run = context.dagster_run
        attempt = context.resume_attempt_number or 1
        message = resume_task_message(run.run_id, attempt, codec_for(self.settings))
        self._send(run, message, "resume of the run")

    def _send(
        self,
        run: DagsterRun,
        message: TaskMessage,
        what: str,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        """Record the task as the run's, then send it to the run's pool (``routing``).

        A pool whose queue does not exist raises before anything is recorded or sent: Dagster
        then ends the run FAILURE with this error as its engine event. The pool goes in the
        run's ``dagster-taskiq/queue`` tag, so that its re-executions and resumes go there too.
        """
        pool = run_pool(run, self.settings, plan_pool(self._instance, run))
        queue = self._routed_queue(run, pool)
        claims.record_sent(self._instance, run.run_id, message.task_id, queue)
        self._instance.add_run_tags(
            run.run_id, {TASK_ID_TAG: message.task_id, QUEUE_TAG: pool, **(tags or {})}
        )
        self.queues.send(queue, message.body, group_id=run.run_id, dedup_id=message.task_id)
        self._instance.report_engine_event(
            f"Sent {what} to SQS queue {queue} as taskiq task {message.task_id}.",
            run,
            EngineEventData({"queue": queue, "task_id": message.task_id}),
            cls=self.__class__,
        )

    def _routed_queue(self, run: DagsterRun, pool: str) -> str:
        """The run's task queue, once SQS confirmed it exists; else an error saying how to make
        it."""
        try:
            queue = task_queue(self.queues.names, self.settings, pool, run.tags)
            self.queues.url(queue)
        except SqsError as exc:
            raise SqsError(
                f"Run {run.run_id} not sent: it is routed to pool {pool!r} "
                f"({QUEUE_TAG} tag of the run, else of its ops, else location_queues): {exc}. "
                f"Create its queue with `dagster-taskiq-cancel queues create --queue {pool}` "
                "(with the launcher's settings), or tag the run with a pool that workers serve."
            ) from exc
        return queue

    def terminate(self, run_id: str) -> bool:
        """Record CANCELING (the durable intent), then send the fast-path hint.

        Returns True once the intent is recorded: a failed send only delays the stop until the
        holding worker's next run-storage poll.
        """
        check.str_param(run_id, "run_id")
        requested_by, reason = terminate_requester()
        return request_cancel(self._instance, self.queues, run_id, reason, requested_by)

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run: DagsterRun) -> CheckRunHealthResult:
        """FAILED once the worker holding the run stops beating (crashed, killed, lost)."""
        return worker_health(self._instance, run, self.settings.heartbeat_timeout_seconds)
