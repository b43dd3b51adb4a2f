"""The worker: runs Dagster work in child processes and stops it when its run is no longer live.

Five loops share one event loop:

- taskiq's Receiver takes tasks from the main queue, one per free slot, and calls ``execute``;
- ``poll_loop`` asks the run storage about every held run every ``poll_interval_seconds``
  (or at once when woken) and stops the children of cancelled runs (see ``authority``);
- ``heartbeat_loop`` writes the worker's heartbeat, and kills its work if it cannot (fencing);
- ``cancel_loop`` reads ``{queue}-cancels``; a request only wakes the poll, it never kills;
- ``hint_loop`` reads this worker's own hint queue (``hints``) the same way, while it holds work.

A task names ids only; the child's arguments come from the run storage (``step_args``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dagster import DagsterEventType, DagsterInstance, DagsterRun, DagsterRunStatus
from dagster._core.events import DagsterEvent, EngineEventData, StepFailureData
from dagster._core.execution.plan.handle import StepHandle
from dagster._grpc.types import ExecuteRunArgs, ResumeRunArgs
from dagster._serdes import serialize_value
from dagster._utils.error import SerializableErrorInfo, serializable_error_info_from_exc_info
from taskiq import Context, TaskiqDepends

from dagster_taskiq_cancel import heartbeats, hints
from dagster_taskiq_cancel.broker import CancellableSqsBroker
from dagster_taskiq_cancel.cleanup import CleanupContext
from dagster_taskiq_cancel.cooperative import CANCEL_FILE_ENV, announce
from dagster_taskiq_cancel.messages import (
    CancelAck,
    CancelRequest,
    MalformedMessage,
    Outcome,
    codec_for,
)
from dagster_taskiq_cancel.settings import TaskiqCancelSettings
from dagster_taskiq_cancel.tasks import (
    EXECUTE_RUN,
    EXECUTE_STEP,
    RELEASED_TAG,
    RESUME_RUN,
    TASK_ID_TAG,
    WORKER_ID_TAG,
    claim_tag,
)
from dagster_taskiq_cancel.timing import finite_seconds, tag_seconds
from dagster_taskiq_cancel.worker import children, metrics, scale_in
from dagster_taskiq_cancel.worker.authority import (
    RUN_STARTABLE,
    cancel_recorded,
    has_ended,
    held_runs,
    is_cancelled,
    run_started,
)
from dagster_taskiq_cancel.worker.canceled import record_canceled, what_stopped
from dagster_taskiq_cancel.worker.cleanup_runner import run_cleanup
from dagster_taskiq_cancel.worker.step_args import step_args, was_launched

logger = logging.getLogger(__name__)

_CLAIM_EVENT = "Run task claimed by"
_RECENT_TASKS = 10_000
_CONTEXT: Any = TaskiqDepends()  # taskiq injects the message context here


@dataclass
class HeldTask:
    """A task this worker runs: its child process and, once stopping, why and since when."""

    task_id: str
    run_id: str
    step_key: str | None
    process: asyncio.subprocess.Process
    tags: Mapping[str, str]
    cancel_file: Path
    request: CancelRequest | None = None
    stop_started_at: float | None = None
    cancel: bool = False  # stopping because the run was cancelled (not ended, not a drain)
    killed: bool = False
    before_start: bool = False  # killed before Dagster started the run: none of it ran
    start_checked: bool = False  # run task: event log checked for a cancel RUN_START overwrote
    ended_since: float | None = None  # when the run was first seen ended while this still ran
    fenced_because: str | None = None  # killed as another worker may run it now (fencing)
    handed_over: bool = False  # stopped at shutdown for run monitoring to resume (scale_in)
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    settled: asyncio.Event = field(default_factory=asyncio.Event)  # the run's record is written


class Worker:
    """One worker process: its slots, its held tasks and its view of the run storage."""

    def __init__(
        self,
        settings: TaskiqCancelSettings,
        instance: DagsterInstance,
        broker: CancellableSqsBroker | None = None,
    ) -> None:
        self.settings = settings
        self.instance = instance
        self.broker = broker or CancellableSqsBroker(settings)
        # Per boot: a restarted worker (PID 1 again in a container) must not beat under the
        # id of the one that died, or the dead one's runs would look alive forever.
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.last_beat = time.monotonic()  # of the last heartbeat written (start: none due yet)
        self.held: dict[str, HeldTask] = {}
        self._recent: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._pending_requests: dict[str, CancelRequest] = {}
        self._wake = asyncio.Event()
        self.hint_queue = hints.hint_queue_name(self.broker.names, self.worker_id)
        self._holding = asyncio.Event()  # set while a task is held: the hint loop listens
        self.codec = codec_for(settings)
        self.rejected = 0
        # One thread for run-storage calls: they block, and sqlite prefers one writer.
        self._storage = ThreadPoolExecutor(max_workers=1, thread_name_prefix="run-storage")
        self._cancel_dir = Path(tempfile.mkdtemp(prefix="dagster-taskiq-cancel-"))
        self._register_tasks()

    # --- tasks -------------------------------------------------------------------------------

    def _register_tasks(self) -> None:
        async def execute_run(run_id: str, context: Context = _CONTEXT) -> None:
            await self.execute(context.message.task_id, run_id, None, 0)

        async def execute_step(
            run_id: str, step_key: str, attempt: str, context: Context = _CONTEXT
        ) -> None:
            await self.execute(context.message.task_id, run_id, step_key, int(attempt))

        async def resume_run(run_id: str, attempt: str, context: Context = _CONTEXT) -> None:
            await self.execute(context.message.task_id, run_id, None, int(attempt), resume=True)

        self.broker.register_task(execute_run, task_name=EXECUTE_RUN)
        self.broker.register_task(execute_step, task_name=EXECUTE_STEP)
        self.broker.register_task(resume_run, task_name=RESUME_RUN)

    async def _storage_call(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` on the storage thread, given up on after the storage timeout.

        A hung storage call must not hang the loop that made it; the thread itself cannot be
        interrupted, so later calls queue behind it, and the heartbeat loop fences the work.
        """
        future = asyncio.get_running_loop().run_in_executor(self._storage, fn, *args)
        timeout = self.settings.heartbeat_timeout_seconds / 2
        return await metrics.storage_call(fn, asyncio.wait_for(future, timeout))

    async def execute(
        self,
        task_id: str,
        run_id: str,
        step_key: str | None,
        attempt: int,
        resume: bool = False,
    ) -> None:
        """Run one task to its end, unless it is a duplicate or its run is no longer live.

        A resume task (run monitoring found the run's worker dead) starts a STARTED run again
        with `dagster api resume_run`; a run task starts only a run that has not started. The
        message was deleted on receipt, so a failure before the child starts is recorded in the
        run (``_fail_task``) rather than left for a timeout.
        """
        if task_id in self.broker.released:
            logger.info("Not starting task %s: handed back to the queue at shutdown", task_id)
            metrics.task_not_started(task_id, step_key, "dropped")
            return
        if task_id in self.held or task_id in self._recent:
            logger.info("Dropping duplicate delivery of task %s", task_id)
            metrics.task_not_started(task_id, step_key, "dropped")
            return
        self._remember(task_id)
        try:
            prepared = await self._storage_call(
                self._prepare, task_id, run_id, step_key, attempt, resume
            )
            if isinstance(prepared, DagsterRunStatus):
                metrics.task_not_started(task_id, step_key, "skipped")
                await self._ack(run_id, step_key, task_id, "skipped", f"run was {prepared.value}")
                return
            if prepared is None:
                metrics.task_not_started(task_id, step_key, "dropped")
                return
            run, argv, env = prepared
            process = await children.spawn(argv, env)
        except Exception:
            error = serializable_error_info_from_exc_info(sys.exc_info())
            logger.exception("Could not start task %s of run %s", task_id, run_id)
            metrics.task_not_started(task_id, step_key, "start_failed")
            message = f"Worker {self.worker_id} could not start the task: {error.message.strip()}"
            with contextlib.suppress(Exception):
                await self._storage_call(self._fail_task, run_id, step_key, message, error)
            return
        cancel_file = Path(env[CANCEL_FILE_ENV])
        held = HeldTask(task_id, run_id, step_key, process, run.tags, cancel_file)
        await self._run_child(held)

    def _prepare(
        self, task_id: str, run_id: str, step_key: str | None, attempt: int, resume: bool
    ) -> tuple[DagsterRun, list[str], dict[str, str]] | DagsterRunStatus | None:
        """The run and the child's argv and env; else the status of a cancelled run (to ack as
        skipped) or None, when the task must not run.

        Every argument comes from the run storage and this worker's instance: the task named
        only ids, and a step runs only if its run's executor recorded launching this very task.
        """
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
            if run.status != DagsterRunStatus.STARTED or not was_launched(
                self.instance, run_id, step_key, task_id
            ):
                logger.warning(
                    "Dropping task %s: run %s (%s) has no record of launching it",
                    task_id,
                    run_id,
                    run.status.value,
                )
                return None
            if not self._claim(run, task_id):
                logger.info("Dropping task %s: another worker claimed it", task_id)
                return None
            args = step_args(self.instance, run, step_key, attempt)
            # Dagster's own way to pass them: an env var (the k8s shape), not the command line.
            env = {e["name"]: e["value"] for e in args.get_command_env()}
            return run, children.dagster_api_argv("execute_step"), self._env(env)
        if run.tags.get(TASK_ID_TAG) != task_id:
            logger.warning(
                "Dropping task %s: run %s was not sent as this task (%s)",
                task_id,
                run_id,
                run.tags.get(TASK_ID_TAG),
            )
            return None
        startable = {DagsterRunStatus.STARTED} if resume else RUN_STARTABLE
        if run.status not in startable or not self._claim(run, task_id):
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
        return run, children.dagster_api_argv(command, serialize_value(run_args)), self._env({})

    def _env(self, extra: Mapping[str, str]) -> dict[str, str]:
        """The worker's environment for a child, with its own cancel deadline file."""
        cancel_file = self._cancel_dir / f"{uuid.uuid4().hex}.deadline"
        return metrics.child_env({**os.environ, **extra, CANCEL_FILE_ENV: str(cancel_file)})

    def _fail_task(
        self,
        run_id: str,
        step_key: str | None,
        message: str,
        error: SerializableErrorInfo | None = None,
    ) -> None:
        """Fail work this worker took and will not finish: nobody else would (its message is
        deleted). A run fails; a step gets a STEP_FAILURE, which its run's executor handles as
        any step failure (a retry if the op has a policy)."""
        run = self.instance.get_run_by_id(run_id)
        if run is None or run.is_finished:
            return
        if step_key is None:
            self.instance.report_run_failed(run, message)
            return
        failure = StepFailureData(
            error=error or SerializableErrorInfo(message, [], "WorkerStoppedStep"),
            user_failure_data=None,
        )
        event = DagsterEvent(
            DagsterEventType.STEP_FAILURE.value,
            job_name=run.job_name,
            step_handle=StepHandle.parse_from_key(step_key),
            message=message,
            event_specific_data=failure,
        )
        self.instance.report_dagster_event(event, run_id)

    def _record_fence(self, held: HeldTask) -> None:
        """Say in the run why its task was killed, and hand the work on.

        A run resumed elsewhere is left to its new holder. A run nobody resumed yet is marked
        released, so that run monitoring sees it lost (``worker_health``) and resumes or fails
        it; a step is failed, so that its run's executor moves on.
        """
        run = self.instance.get_run_by_id(held.run_id)
        if run is None or run.is_finished:
            return
        message = f"Worker {self.worker_id} killed task {held.task_id}: {held.fenced_because}."
        if held.step_key is not None:
            self._fail_task(held.run_id, held.step_key, message)
            return
        self.instance.report_engine_event(message, run)
        if run.tags.get(TASK_ID_TAG) == held.task_id:
            self.instance.add_run_tags(held.run_id, {RELEASED_TAG: self.worker_id})

    def _remember(self, task_id: str) -> None:
        self._recent[task_id] = None
        while len(self._recent) > _RECENT_TASKS:
            self._recent.popitem(last=False)

    def _claim(self, run: DagsterRun, task_id: str) -> bool:
        """Claim a task for this worker; of concurrent claims, the first in the event log wins.

        A tag written and read back is not enough: two workers that receive copies of the task
        at the same moment both write the tag and may each read back their own. The event log
        orders entries by storage id, so every claimer agrees on which claim came first. Each
        resume attempt and each step attempt is a task of its own, with its own claim; only a
        run or resume claim makes this worker the run's holder (``WORKER_ID_TAG``). ``run`` is
        the record just read by ``_prepare``.
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

    async def _run_child(self, held: HeldTask) -> None:
        task_id, run_id, step_key, process = held.task_id, held.run_id, held.step_key, held.process
        self.held[task_id] = held
        metrics.task_started(held)
        self._holding.set()
        logger.info("Started task %s (run %s) as pid %s", task_id, run_id, process.pid)
        # A cancel may have landed between the start check and the spawn: look again now.
        self._wake.set()
        try:
            try:
                await self._storage_call(self._record_start, held)
            except Exception:
                logger.exception("Could not record the start of task %s", task_id)
            returncode = await process.wait()
        finally:
            held.exited.set()
            self.held.pop(task_id, None)
            metrics.task_exited(held)
            children.kill_group(process.pid)
            held.cancel_file.unlink(missing_ok=True)
            if all(h.run_id != run_id for h in self.held.values()):
                self._pending_requests.pop(run_id, None)
        logger.info("Task %s ended with exit code %s", task_id, returncode)
        try:
            cleanup = await self._storage_call(self._settle, held, returncode)
        except Exception:
            # The run storage decides the run's status anyway; the ack must still go out.
            logger.exception("Could not settle the run of task %s", task_id)
            cleanup = False
        finally:
            held.settled.set()
        metrics.task_ended(held, returncode, self.instance, self._storage)
        if not held.cancel or held.fenced_because is not None:
            return  # finished on its own, or stopped by a drain: no ack, and never a cleanup
        outcome: Outcome = "killed" if held.killed else "cancelled"
        detail = f"exit code {returncode}"
        if held.before_start:
            detail = "stopped before Dagster started the run; none of it ran"
        if cleanup:
            context = CleanupContext(run_id, step_key, outcome, 0, dict(held.tags))
            error = await run_cleanup(context, metrics.child_env(os.environ))
            if error is not None:
                outcome, detail = "cleanup_failed", f"cleanup handler failed: {error}"
        await self._ack(run_id, step_key, task_id, outcome, detail, held)

    def _record_start(self, held: HeldTask) -> None:
        """Put who runs the task, and as which pid, in the run's event log."""
        run = self.instance.get_run_by_id(held.run_id)
        if run is None:
            return
        what = f"step {held.step_key}" if held.step_key else "run"
        self.instance.report_engine_event(
            f"Worker {self.worker_id} started {what} task as pid {held.process.pid}.",
            run,
            EngineEventData(
                {"worker_id": self.worker_id, "task_id": held.task_id, "pid": held.process.pid}
            ),
            step_key=held.step_key,
        )

    def _settle(self, held: HeldTask, returncode: int | None) -> bool:
        """Leave the run in a true state once the task's child is gone; True to run cleanup.

        A run task whose run holds a cancel is a cancel, even if the child exited by itself (it
        read CANCELING at start) or Dagster's RUN_START overwrote the cancel: CANCELING is made
        the status again, and the run ends CANCELED. A run process that failed the
        run after a cancel (the interrupt landed in a resume's start-up, or a start race) ends
        it CANCELED, as asked. A cancelled run its process left unended (SIGKILLed, killed before
        RUN_START, or exited) is recorded CANCELED at once (``record_canceled``), not at the
        sensor's next tick. A run process that died without ending a run nobody cancelled (OOM
        kill, crash) fails the run. A superseded task (fenced off) leaves the run alone, and one
        stopped at shutdown for a resume is left to ``stop_all`` to release (``scale_in``).
        """
        if held.fenced_because is not None:
            self._record_fence(held)
            return False
        if held.handed_over and scale_in.awaits_resume(self.instance, held.run_id):
            return False
        run = self.instance.get_run_by_id(held.run_id)
        if run is None or held.step_key is not None:
            return held.cancel and held.stop_started_at is not None and not held.before_start
        if not held.cancel and run.status != DagsterRunStatus.SUCCESS:
            held.cancel = is_cancelled(run.status) or cancel_recorded(self.instance, run.run_id)
        if held.cancel and run.status == DagsterRunStatus.FAILURE:
            self.instance.report_run_canceled(
                run,
                message=(
                    f"Worker {self.worker_id}: the run process failed the run after its cancel "
                    "interrupted it; recording CANCELED, as the cancel asked."
                ),
            )
        if not held.cancel:
            if not run.is_finished:
                self.instance.report_run_failed(
                    run,
                    f"Run process on worker {self.worker_id} exited with code {returncode} "
                    "before the run finished.",
                )
            return False
        if not run.is_finished and run.status != DagsterRunStatus.CANCELING:
            self._reassert_cancel(run)
        if not run.is_finished:
            record_canceled(
                self.instance,
                run.run_id,
                self.worker_id,
                what_stopped(held.task_id, returncode, held.before_start, held.killed),
                {"task_id": held.task_id, "exit_code": returncode},
            )
        return (
            held.stop_started_at is not None
            and not held.before_start
            and run.status != DagsterRunStatus.SUCCESS
        )

    def _reassert_cancel(self, run: DagsterRun) -> None:
        self.instance.report_run_canceling(
            run,
            message=(
                f"Worker {self.worker_id}: the cancel recorded earlier was overwritten when "
                "Dagster started the run (RUN_START); recording CANCELING again so that the run "
                "stops and ends CANCELED."
            ),
        )

    def _reassert_if_overwritten(self, run_id: str) -> bool:
        """For a run just seen STARTED: True if its log holds a cancel (re-recorded now)."""
        if not cancel_recorded(self.instance, run_id):
            return False
        run = self.instance.get_run_by_id(run_id)
        if run is None or run.is_finished:
            return False
        if run.status != DagsterRunStatus.CANCELING:
            self._reassert_cancel(run)
        return True

    def _record_orphan_stop(self, held: HeldTask, status: DagsterRunStatus | None) -> None:
        run = self.instance.get_run_by_id(held.run_id)
        if run is not None:
            self.instance.report_engine_event(
                f"Worker {self.worker_id} is stopping task {held.task_id}: it was still running "
                f"{self.settings.grace_seconds:g}s after the run ended "
                f"{status.value if status else 'or was deleted'}.",
                run,
                step_key=held.step_key,
            )

    # --- stopping ------------------------------------------------------------------------------

    async def poll_loop(self) -> None:
        """Ask the run storage about held runs every poll interval, or at once when woken."""
        while True:
            try:
                await self.check_held()
            except Exception:
                logger.exception("Run storage check failed; trying again next interval")
            metrics.loop_tick(metrics.POLL_LOOP)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.poll_interval_seconds)
            self._wake.clear()

    async def heartbeat_loop(self) -> None:
        """Beat every sixth of the heartbeat timeout, apart from the poll: a failing write must
        not stop the cancel checks, nor a slow check the beats.

        Fencing: a worker that has not beaten for two thirds of the timeout may soon be taken
        for dead, and its runs resumed elsewhere; it kills its work first, so that nothing runs
        twice, and says so in each run once the storage answers (``_settle``).
        """
        timeout = self.settings.heartbeat_timeout_seconds
        while True:
            try:
                await self._storage_call(heartbeats.beat, self.instance, self.worker_id)
                self.last_beat = time.monotonic()
            except Exception as exc:
                silent = time.monotonic() - self.last_beat
                logger.warning("Could not write the heartbeat (%.0fs without): %r", silent, exc)
                if silent >= timeout * 2 / 3:
                    self._fence(f"it could not write its heartbeat for {silent:.0f}s")
            metrics.loop_tick(metrics.HEARTBEAT_LOOP)
            await asyncio.sleep(timeout / 6)

    def _fence(self, why: str, only: HeldTask | None = None) -> None:
        """SIGKILL held work that another worker may be running now: no interrupt, as Dagster's
        run process would write the run's failure into a run that lives on elsewhere."""
        for held in [only] if only else list(self.held.values()):
            if held.fenced_because is not None:
                continue
            logger.critical("Killing task %s of run %s: %s", held.task_id, held.run_id, why)
            held.killed = True
            held.fenced_because = why
            asyncio.get_running_loop().create_task(self._kill(held))

    async def check_held(self) -> None:
        """One batched query for every held run; then act on what the authority says."""
        waiting = [h for h in self.held.values() if h.stop_started_at is None]
        if not waiting:
            return
        runs = await self._storage_call(held_runs, self.instance, {h.run_id for h in waiting})
        for held in waiting:
            run = runs.get(held.run_id)
            status = run.status if run else None
            sent = run.tags.get(TASK_ID_TAG) if run else None
            if held.step_key is None and sent is not None and sent != held.task_id:
                self._fence(f"the run was sent again as task {sent} (a resume)", held)
                continue
            first_seen_started = (
                held.step_key is None
                and status == DagsterRunStatus.STARTED
                and not held.start_checked
            )
            if first_seen_started:
                held.start_checked = True
                if await self._storage_call(self._reassert_if_overwritten, held.run_id):
                    status = DagsterRunStatus.CANCELING
            if is_cancelled(status):
                await self._cancel(held)
            elif has_ended(status):
                await self._leave_to_finish(held, status)

    async def _cancel(self, held: HeldTask) -> None:
        """Stop a cancelled task; a run that Dagster has not started yet is killed outright.

        Before RUN_START, an interrupt can land after Dagster's run process read the status and
        before it writes RUN_START, which would overwrite the cancel and end the run FAILURE.
        None of the job has run at that point, so SIGKILL loses nothing.
        """
        held.cancel = True
        # Seen STARTED before (``start_checked``): RUN_START is written, no need to ask again.
        if (
            held.step_key is None
            and not held.start_checked
            and not await self._storage_call(run_started, self.instance, held.run_id)
        ):
            logger.info("Killing task %s: its run was cancelled before it started", held.task_id)
            held.stop_started_at = time.time()
            held.request = self._pending_requests.get(held.run_id)
            held.before_start = True
            asyncio.get_running_loop().create_task(self._kill(held))
            return
        self.stop(held)

    async def _leave_to_finish(self, held: HeldTask, status: DagsterRunStatus | None) -> None:
        """An ended run's processes exit by themselves; stop only one still running after grace.

        Such a task is an orphan (its run was failed while it ran, for instance by run
        monitoring): it is stopped without an ack and without cleanup, as nobody cancelled it.
        """
        now = time.monotonic()
        if held.ended_since is None:
            held.ended_since = now
        elif now - held.ended_since >= self.settings.grace_seconds:
            await self._storage_call(self._record_orphan_stop, held, status)
            self.stop(held)

    def stop(self, held: HeldTask) -> None:
        """Notice (the deadline file), then SIGTERM (Dagster's interrupt), then SIGKILL.

        For a cancel the deadline file is always written, so that the task's processes can tell
        a cancel from other interrupts (``cancellation_requested()``, no retry of a step).
        """
        if held.stop_started_at is not None:
            return
        held.stop_started_at = time.time()
        held.request = self._pending_requests.get(held.run_id)
        notice, grace = self._timing(held, "notice_seconds"), self._timing(held, "grace_seconds")
        logger.info(
            "Stopping task %s (pid %s): %s; notice %ss, grace %ss",
            held.task_id,
            held.process.pid,
            "run cancelled" if held.cancel else "not cancelled (run ended, or shutdown)",
            notice,
            grace,
        )
        # The interrupt first: announcing may fail (a full disk), and must not lose the stop.
        asyncio.get_running_loop().create_task(self._interrupt(held, notice, grace))
        if held.cancel:
            try:
                announce(held.cancel_file, held.stop_started_at + notice)
            except OSError as exc:
                logger.warning("Could not write the cancel deadline of %s: %s", held.task_id, exc)

    def _timing(self, held: HeldTask, name: str) -> float:
        """A signed cancel request's value, else the run tag's, else the setting.

        An unsigned request is only a hint (anyone who can send to the queue can forge it), so
        it never changes how a stop is timed.
        """
        trusted = held.request if held.request and self.codec.signed else None
        requested = getattr(trusted, name, None)
        if requested is not None:
            return finite_seconds(float(requested))  # the message model refuses inf and NaN
        return tag_seconds(held.tags, name, float(getattr(self.settings, name)))

    async def _interrupt(self, held: HeldTask, notice: float, grace: float) -> None:
        if notice > 0 and await self._exits_within(held, notice):
            return
        children.signal_process(held.process.pid, signal.SIGTERM)
        if await self._exits_within(held, grace):
            return
        logger.warning("Task %s did not stop in %ss: SIGKILL", held.task_id, grace)
        await self._kill(held)

    async def _kill(self, held: HeldTask) -> None:
        """SIGKILL every process of the task through its guard, which also finds those that
        left the process group (a new session); the group directly if the guard hangs."""
        held.killed = True
        children.kill_all(held.process.pid)
        if not await self._exits_within(held, children.GUARD_KILL_SECONDS):
            logger.warning("Guard of task %s did not exit: SIGKILL of its group", held.task_id)
            children.kill_group(held.process.pid)

    @staticmethod
    async def _exits_within(held: HeldTask, seconds: float) -> bool:
        try:
            await asyncio.wait_for(held.exited.wait(), seconds)
        except TimeoutError:
            return False
        return True

    # --- cancel queue and acks -------------------------------------------------------------------

    async def cancel_loop(self) -> None:
        """Wake the poll for every cancel request naming a held run; set aside malformed ones.

        Every message is deleted whatever handling it raised: one bad body must never leave the
        worker deaf to the cancels after it.
        """
        while True:
            await self._read_cancels(self.broker.names.cancels)
            metrics.loop_tick(metrics.CANCEL_LOOP)

    async def hint_loop(self) -> None:
        """Read this worker's own hint queue while it holds work, as ``cancel_loop`` does.

        An idle worker has nothing to stop, so it does not poll here at all (the idle cost stays
        that of the main and cancels queues); hints sent meanwhile wait in the queue.
        """
        while True:
            await self._holding.wait()
            await self._read_cancels(self.hint_queue)
            if not self.held:
                self._holding.clear()

    async def _read_cancels(self, queue: str) -> None:
        """One long poll of ``queue``; every message is handled, then deleted."""
        for message in await self.broker.receive(queue, 10):
            try:
                await self._handle_cancel(message, queue)
            except Exception:
                logger.exception(
                    "Deleting cancel message %s: handling it failed", message.get("MessageId")
                )
            await self.broker.delete(queue, message["ReceiptHandle"])

    async def _handle_cancel(self, message: Mapping[str, Any], queue: str) -> None:
        try:
            request = self.codec.loads(CancelRequest, message.get("Body", ""))
        except MalformedMessage as exc:
            self.rejected += 1
            metrics.cancel_request("malformed")
            logger.warning(
                "Deleting malformed cancel message %s: %s (%d rejected so far)",
                message.get("MessageId"),
                exc,
                self.rejected,
            )
            return
        if any(h.run_id == request.run_id for h in self.held.values()):
            logger.info("Cancel hint for held run %s from %s", request.run_id, queue)
            self._pending_requests[request.run_id] = request
            self._wake.set()
            metrics.cancel_request("woke")
            return
        metrics.cancel_request("not_running")
        await self._ack(
            request.run_id, request.step_key, "", "not_running", "", request=request, retry=False
        )

    async def _ack(
        self,
        run_id: str,
        step_key: str | None,
        task_id: str,
        outcome: Outcome,
        detail: str,
        held: HeldTask | None = None,
        request: CancelRequest | None = None,
        retry: bool = True,
    ) -> None:
        """Tell the reconciliation sensor what happened; a failed send is retried until shutdown.

        Only ``not_running`` (an answer to a hint, counted and nothing else) is tried once: its
        retries must not hold up the cancel loop.
        """
        metrics.stop_outcome(outcome)
        request = request or (held.request if held else None)
        ack = CancelAck(
            request_id=request.request_id if request else None,
            run_id=run_id,
            step_key=step_key,
            task_id=task_id,
            worker_id=self.worker_id,
            outcome=outcome,
            requested_at=request.requested_at
            if request
            else (held.stop_started_at if held else None),
            detail=detail,
        )
        send = self.broker.send_until_sent if retry else self.broker.send
        try:
            await send(
                self.broker.names.acks,
                self.codec.dumps(ack),
                group_id=run_id,
                dedup_id=uuid.uuid4().hex,
            )
        except asyncio.CancelledError:
            logger.error("Worker shut down before the %s ack for run %s was sent", outcome, run_id)
            raise
        except Exception as exc:
            logger.warning("Could not send %s ack for run %s: %s", outcome, run_id, exc)

    # --- shutdown --------------------------------------------------------------------------------

    async def stop_all(
        self, why: str = "its drain time ran out", queue_closed: asyncio.Task[int] | None = None
    ) -> None:
        """Stop every held task, and wait until each child is gone and its run settled.

        Used when a drain runs out or a loop died. Nobody cancelled this work: a run that run
        monitoring will resume is handed over, any other is failed with the reason
        (``scale_in``). A handed-over run is released once its processes are gone and
        ``queue_closed`` is done (this worker's last main-queue poll answered), so that its
        resume goes to another worker. Tasks already stopping (a cancel) finish as they were.
        """
        tasks = list(self.held.values())
        for held in tasks:
            if held.stop_started_at is not None:
                continue
            with contextlib.suppress(Exception):
                held.handed_over = await self._storage_call(
                    scale_in.record_leaving,
                    self.instance,
                    self.worker_id,
                    held.run_id,
                    held.task_id,
                    held.step_key,
                    why,
                )
            self.stop(held)
        await asyncio.gather(*(h.settled.wait() for h in tasks))
        handed_over = [h for h in tasks if h.handed_over]
        if handed_over and queue_closed is not None:
            await asyncio.wait([queue_closed])
        for held in handed_over:
            with contextlib.suppress(Exception):
                await self._storage_call(
                    scale_in.release, self.instance, self.worker_id, held.run_id, held.task_id
                )

    def close(self) -> None:
        self._storage.shutdown(wait=False)
        shutil.rmtree(self._cancel_dir, ignore_errors=True)
