"""The worker: runs Dagster work in child processes and stops it when its run is no longer live.

Five loops share one event loop:

- taskiq's Receiver takes tasks from the main queue, one per free slot, and calls ``execute``;
- ``poll_loop`` asks the run storage about every held run at once when woken (a cancel hint),
  else every ``poll_interval_seconds`` (the backstop), and stops the children of cancelled runs
  (see ``authority``);
- ``heartbeat_loop`` writes the worker's heartbeat, and kills its work if it cannot (fencing);
- ``cancel_loop`` reads ``{queue}-cancels``; a request only wakes the poll, it never kills;
- ``hint_loop`` reads this worker's own hint queue (``hints``) the same way, while it holds work.

A task's life is one ``held.Phase``, moved on only here: RUNNING (its child runs), EXITED (its
run's record not yet written: a failed ``settle`` is retried in the background until the run
storage answers, with the slot already free), RELEASED (a run task fenced off for lost storage,
watched by the poll for a cancel that lands after the release), SETTLED (cleanup and the ack of
a cancel, sent only now), DONE.

A task's way through the worker, one module per step: ``admission`` (may it run, with what
arguments: ids only in the task, everything else from the run storage), ``children`` and
``guard`` (its processes), ``authority`` (what the run storage says), ``stopping`` (notice,
SIGTERM, SIGKILL), ``settle`` and ``records`` (what is written into the run), ``acks`` (what
the sensor is told), ``scale_in`` (shutdown with work held).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Coroutine, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from dagster import DagsterInstance, DagsterRunStatus
from dagster._core.storage.dagster_run import FINISHED_STATUSES
from dagster._utils.error import serializable_error_info_from_exc_info
from taskiq import Context, TaskiqDepends

from dagster_taskiq_cancel import claims, heartbeats, hints, metrics
from dagster_taskiq_cancel.backoff import Backoff
from dagster_taskiq_cancel.broker import CancellableSqsBroker
from dagster_taskiq_cancel.cleanup import CleanupContext
from dagster_taskiq_cancel.cooperative import announce
from dagster_taskiq_cancel.messages import CancelRequest, MalformedMessage, Outcome, codec_for
from dagster_taskiq_cancel.settings import TaskiqCancelSettings
from dagster_taskiq_cancel.storage_pool import close_connections, pool_connections
from dagster_taskiq_cancel.tasks import (
    EXECUTE_RUN,
    EXECUTE_STEP,
    RECEIVED_FROM,
    RESUME_RUN,
    task_message,
)
from dagster_taskiq_cancel.worker import children, keys, records, scale_in, stopping
from dagster_taskiq_cancel.worker.acks import Acks
from dagster_taskiq_cancel.worker.admission import Gate, NotClaimed
from dagster_taskiq_cancel.worker.authority import (
    HeldRun,
    has_ended,
    held_runs,
    is_cancelled,
    run_started,
)
from dagster_taskiq_cancel.worker.cleanup_runner import run_cleanup
from dagster_taskiq_cancel.worker.held import HeldTask, Phase
from dagster_taskiq_cancel.worker.inflight import InFlight
from dagster_taskiq_cancel.worker.settle import cancel_released, reassert_if_overwritten, settle

logger = logging.getLogger(__name__)

_RECENT_TASKS = 10_000
_CONTEXT: Any = TaskiqDepends()  # taskiq injects the message context here


class Worker:
    """One worker process: its slots, its held tasks and its view of the run storage."""

    def __init__(
        self,
        settings: TaskiqCancelSettings,
        instance: DagsterInstance,
        broker: CancellableSqsBroker | None = None,
    ) -> None:
        self.settings = settings
        claims.sql_storage(instance)  # a clear error now, not at the first task
        self.instance = instance
        self.broker = broker or CancellableSqsBroker(settings)
        # Per boot: a restarted worker (PID 1 again in a container) must not beat under the
        # id of the one that died, or the dead one's runs would look alive forever.
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.last_beat = time.monotonic()  # of the last heartbeat written (start: none due yet)
        self.held: dict[str, HeldTask] = {}  # RUNNING: their children run
        self.finishing: dict[str, HeldTask] = {}  # EXITED, RELEASED or SETTLED: not DONE yet
        self._admitting: set[str] = set()  # tasks between dequeue and ``held`` (or drop)
        self._background: set[asyncio.Task[Any]] = set()  # settles retried, acks sent
        self._recent: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._pending_requests: dict[str, CancelRequest] = {}
        self._wake = asyncio.Event()
        self.hint_queue = hints.hint_queue_name(self.broker.names, self.worker_id)
        self._holding = asyncio.Event()  # set while a task is held: the hint loop listens
        self.codec = codec_for(settings)
        self.rejected = 0
        # One thread for run-storage calls: they block, and sqlite prefers one writer.
        self._storage = ThreadPoolExecutor(max_workers=1, thread_name_prefix="run-storage")
        # The heartbeat's own thread and instance (so its own connections): a queue of calls
        # on the storage thread, or one slow call, must not starve the beat.
        self._beats = ThreadPoolExecutor(max_workers=1, thread_name_prefix="heartbeat")
        self._beat_instance: DagsterInstance | None = None  # made on the heartbeat thread
        self._cancel_dir = Path(tempfile.mkdtemp(prefix="dagster-taskiq-cancel-"))
        self._gate = Gate(instance, self.worker_id, self._cancel_dir)
        self._acks = Acks(self.broker, self.codec, self.worker_id, settings.cancel_timeout_seconds)
        self._register_tasks()

    # --- tasks -------------------------------------------------------------------------------

    def _register_tasks(self) -> None:
        async def execute_run(run_id: str, context: Context = _CONTEXT) -> None:
            await self.execute(context.message.task_id, run_id, None, 0, queue=_came(context))

        async def execute_step(
            run_id: str, step_key: str, attempt: str, context: Context = _CONTEXT
        ) -> None:
            task_id, queue = context.message.task_id, _came(context)
            await self.execute(task_id, run_id, step_key, int(attempt), queue=queue)

        async def resume_run(run_id: str, attempt: str, context: Context = _CONTEXT) -> None:
            task_id, queue = context.message.task_id, _came(context)
            await self.execute(task_id, run_id, None, int(attempt), resume=True, queue=queue)

        self.broker.register_task(execute_run, task_name=EXECUTE_RUN)
        self.broker.register_task(execute_step, task_name=EXECUTE_STEP)
        self.broker.register_task(resume_run, task_name=RESUME_RUN)

    @property
    def _storage_timeout(self) -> float:
        """How long one storage call is waited for: half the heartbeat timeout."""
        return self.settings.heartbeat_timeout_seconds / 2

    @property
    def _settle_backoff_max(self) -> float:
        """The longest wait between two tries of a failed settle: one heartbeat interval."""
        return self.settings.heartbeat_timeout_seconds / 6

    async def _storage_call(self, fn: Any, *args: Any, to_the_end: bool = False) -> Any:
        """``fn(*args)`` on the storage thread, given up on after the storage timeout, unless
        ``to_the_end``.

        A hung storage call must not hang the loop that made it; the thread itself cannot be
        interrupted, so later calls queue behind it, and the heartbeat loop fences the work. A
        call whose outcome decides who owns work (admission's claim) is waited for to its end.
        """
        future = asyncio.get_running_loop().run_in_executor(self._storage, fn, *args)
        waited = future if to_the_end else asyncio.wait_for(future, self._storage_timeout)
        return await metrics.storage_call(fn, waited)

    async def execute(
        self,
        task_id: str,
        run_id: str,
        step_key: str | None,
        attempt: int,
        resume: bool = False,
        queue: str | None = None,
    ) -> None:
        """Run one task to its end, unless it is a duplicate or its run is no longer live.

        ``queue`` is the queue the task came from (None: the first served one): a task its run
        storage routed elsewhere is dropped (``Gate.admit``), and a hand-back goes there.

        A resume task (run monitoring found the run's worker dead) starts a STARTED run again
        with `dagster api resume_run`; a run task starts only a run that has not started. The
        message was deleted on receipt: an error before the claim sends the task again
        (``_hand_back``); one after it is this worker's to record in the run
        (``records.fail_task``) rather than leave for a timeout. Admission is waited for to its
        end, however slow the storage: a claim that landed after the worker gave up waiting
        would be nobody's, as every other worker refuses the copy sent again.
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
        self._admitting.add(task_id)
        queue = queue or self.broker.task_queues[0]
        try:
            admitted = await self._storage_call(
                self._gate.admit, task_id, run_id, step_key, attempt, resume, queue, to_the_end=True
            )
            if isinstance(admitted, DagsterRunStatus):
                metrics.task_not_started(task_id, step_key, "skipped")
                detail = f"run was {admitted.value}"
                await self._acks.send(run_id, step_key, task_id, "skipped", detail)
                return
            if admitted is None:
                metrics.task_not_started(task_id, step_key, "dropped")
                return
            process = await children.spawn(admitted.argv, admitted.env)
        except NotClaimed as exc:
            # Not this worker's to fail: it did not claim the task.
            await self._hand_back(task_id, run_id, step_key, attempt, resume, queue, exc)
            return
        except Exception:
            error = serializable_error_info_from_exc_info(sys.exc_info())
            logger.exception("Could not start task %s of run %s", task_id, run_id)
            metrics.task_not_started(task_id, step_key, "start_failed")
            message = f"Worker {self.worker_id} could not start the task: {error.message.strip()}"
            with contextlib.suppress(Exception):
                await self._storage_call(
                    records.fail_task, self.instance, run_id, step_key, message, error
                )
            return
        finally:
            self._admitting.discard(task_id)
        tags, cancel_file = admitted.run.tags, admitted.cancel_file
        held = HeldTask(task_id, run_id, step_key, process, tags, cancel_file)
        await self._run_child(held)

    async def _hand_back(
        self,
        task_id: str,
        run_id: str,
        step_key: str | None,
        attempt: int,
        resume: bool,
        queue: str,
        why: BaseException,
    ) -> None:
        """Send the task again for another try: its message was deleted on receipt
        (``WHEN_RECEIVED``), and admission failed before this worker claimed it."""
        logger.warning("Handing task %s of run %s back to the queue: %r", task_id, run_id, why)
        metrics.task_not_started(task_id, step_key, "handed_back")
        self._recent.pop(task_id, None)  # the copy may come back here
        message = task_message(run_id, step_key, attempt, resume, self.codec)
        group_id = message.task_id if step_key is not None else run_id
        await self.broker.send_until_sent(
            queue, message.body, group_id, f"{task_id}/{uuid.uuid4().hex}"
        )

    def holding(self) -> heartbeats.Beat:
        """The heartbeat to write: the time, then the tasks held (admitting, running, or exited
        with their run's record still to write). Both are read here on the event loop, so a task
        missing from a beat was claimed after it, or is recorded (or released) already."""
        now = time.time()
        exited = (t for t, h in self.finishing.items() if h.phase == Phase.EXITED)
        tasks = frozenset({*self._admitting, *self.held, *exited})
        return heartbeats.Beat(now, tasks, self.hint_queue)

    def _remember(self, task_id: str) -> None:
        self._recent[task_id] = None
        while len(self._recent) > _RECENT_TASKS:
            self._recent.popitem(last=False)

    async def _run_child(self, held: HeldTask) -> None:
        task_id, run_id, process = held.task_id, held.run_id, held.process
        self.held[task_id] = held
        metrics.task_started(held)
        self._holding.set()
        logger.info("Started task %s (run %s) as pid %s", task_id, run_id, process.pid)
        # A cancel may have landed between the start check and the spawn: look again now.
        self._wake.set()
        try:
            try:
                await self._storage_call(records.record_start, self.instance, self.worker_id, held)
            except Exception:
                logger.exception("Could not record the start of task %s", task_id)
            returncode = await process.wait()
        finally:
            held.returncode = process.returncode
            held.advance(Phase.EXITED)
            self.held.pop(task_id, None)
            self.finishing[task_id] = held
            metrics.task_exited(held)
            children.kill_group(process.pid)
            held.cancel_file.unlink(missing_ok=True)
            if not self._answers_for(run_id):
                self._pending_requests.pop(run_id, None)
        logger.info("Task %s ended with exit code %s", task_id, returncode)
        settling = InFlight(self._storage, settle, self.instance, self.worker_id, held, returncode)
        try:
            cleanup = await settling.attempt(self._storage_timeout)
        except Exception as exc:
            # The slot is freed; the run's record (and, for a cancel, the ack) waits for storage.
            logger.error(
                "Could not settle the run of task %s (%r); retrying until the run storage answers",
                task_id,
                exc,
            )
            self._in_background(self._settle_until_done(held, settling))
            return
        await self._after_settle(held, cleanup)

    def _in_background(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _done(self, held: HeldTask) -> None:
        held.advance(Phase.DONE)
        self.finishing.pop(held.task_id, None)

    def _answers_for(self, run_id: str) -> bool:
        """Whether a task of ``run_id`` still runs here, or still waits for its record."""
        tasks = [*self.held.values(), *self.finishing.values()]
        return any(h.run_id == run_id and h.phase <= Phase.RELEASED for h in tasks)

    async def _settle_until_done(self, held: HeldTask, settling: InFlight[bool]) -> None:
        """Try ``settle`` again until it succeeds: a call still running is waited for, a failed
        one is made again after a backoff of at most ``_settle_backoff_max`` seconds.

        So the run of a task killed while the storage was away (fenced) is recorded and released
        at most ``_settle_backoff_max`` seconds (plus the calls queued before it) after the
        storage answers again, and a cancelled one ends CANCELED and is acknowledged.
        """
        backoff = Backoff(min(1.0, self._settle_backoff_max), self._settle_backoff_max)
        while True:
            try:
                cleanup = await settling.attempt(self._storage_timeout)
            except asyncio.TimeoutError:
                logger.warning(
                    "Settling task %s: the run storage still does not answer", held.task_id
                )
                continue  # the same call is still running: wait for it again
            except Exception as exc:
                wait = backoff.next()
                logger.warning(
                    "Settling task %s failed again (%r); next try in %.1fs",
                    held.task_id,
                    exc,
                    wait,
                )
                await asyncio.sleep(wait)
                continue
            logger.info(
                "Settled the run of task %s after the run storage answered again", held.task_id
            )
            await self._after_settle(held, cleanup)
            return

    async def _after_settle(self, held: HeldTask, cleanup: bool) -> None:
        """The run's record is written: run the cleanup handler and send the ack of a cancel.

        A fenced run task is RELEASED, not done: a cancel recorded after its release is ended
        by the poll (``_check_released``), as nobody else would end it.
        """
        metrics.task_ended(held, held.returncode, self.instance, self._storage)
        if held.fenced_because is not None and held.step_key is None:
            held.advance(Phase.RELEASED)
            self._wake.set()
            return
        held.advance(Phase.SETTLED)
        try:
            if held.cancel and held.fenced_because is None:
                await self._acknowledge(held, cleanup)
            # else: finished on its own, or stopped by a drain: no ack, and never a cleanup
        finally:
            self._done(held)

    async def _acknowledge(self, held: HeldTask, cleanup: bool) -> None:
        """Run the cancel's cleanup handler (when due), then tell the sensor how it stopped."""
        run_id, step_key, task_id = held.run_id, held.step_key, held.task_id
        outcome: Outcome = "killed" if held.killed else "cancelled"
        detail = f"exit code {held.returncode}"
        if held.before_start:
            detail = "stopped before Dagster started the run; none of it ran"
        if cleanup:
            context = CleanupContext(run_id, step_key, outcome, 0, dict(held.tags))
            env = keys.child_env(metrics.child_env(os.environ), keep_keys=False)
            error = await run_cleanup(context, env)
            if error is not None:
                outcome, detail = "cleanup_failed", f"cleanup handler failed: {error}"
        await self._acks.send(run_id, step_key, task_id, outcome, detail, held)

    # --- stopping ------------------------------------------------------------------------------

    async def poll_loop(self) -> None:
        """Ask the run storage about held runs at once when woken (a cancel hint, a task
        start, a release), else every poll interval: the backstop for a hint that never came.

        What waits for the backstop when no hint comes: a cancel whose hints were lost, an
        ended run's orphan stop (after its grace), a resume elsewhere (``resent_as``), a cancel
        of a released run, and the first look at a run task's STARTED (``reassert``).
        """
        while True:
            try:
                await self.check_held()
            except Exception:
                logger.exception("Run storage check failed; trying again next interval")
            metrics.loop_tick(metrics.POLL_LOOP)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.poll_interval_seconds)
            self._wake.clear()

    async def heartbeat_loop(self) -> None:
        """Beat every sixth of the heartbeat timeout, on a thread and an instance of its own: a
        failing write must not stop the cancel checks, nor a slow check or a queue of storage
        calls the beats.

        Fencing: a worker that has not beaten for two thirds of the timeout may soon be taken
        for dead, and its runs resumed elsewhere; it kills its work first, so that nothing runs
        twice, and says so in each run once the storage answers (``settle``, retried). The kill
        comes two thirds of the timeout after the start of the last beat that succeeded, never
        sooner: a beat still waiting on the storage is waited for until then, and a beat that
        got through late counts from when it was made.
        """
        timeout = self.settings.heartbeat_timeout_seconds
        fence_after, interval = timeout * 2 / 3, timeout / 6
        beat: InFlight[None] = InFlight(self._beats, self._beat)
        failing = False
        while True:
            left = self.last_beat + fence_after - time.monotonic()
            if failing and left <= 0:
                self._fence_for_silence()
            try:
                wait = min(self._storage_timeout, left) if left > 0 else interval
                await beat.attempt(wait, self.holding())
                self.last_beat = beat.started_at or self.last_beat
                failing, next_beat = False, interval
            except Exception as exc:
                silent = time.monotonic() - self.last_beat
                logger.warning("Could not write the heartbeat (%.0fs without): %r", silent, exc)
                failing, next_beat = True, min(interval, max(fence_after - silent, 0))
                if silent >= fence_after:
                    self._fence_for_silence()
                    next_beat = interval
            metrics.loop_tick(metrics.HEARTBEAT_LOOP)
            await asyncio.sleep(next_beat)

    def _fence_for_silence(self) -> None:
        silent = time.monotonic() - self.last_beat
        self._fence(
            f"it could not write its heartbeat for {silent:.0f}s (the run storage did not answer)"
        )

    async def register(self) -> None:
        """The first heartbeat, before anything can name this worker (its hint queue, a claim):
        run monitoring never finds a claim of a live worker without a row."""
        await asyncio.get_running_loop().run_in_executor(self._beats, self._beat, self.holding())

    async def forget(self) -> None:
        """Delete the heartbeat row at a clean exit, on the heartbeat thread, so after any beat
        still in flight. A failure leaves the row to the sweep (``sweep``)."""
        try:
            await asyncio.get_running_loop().run_in_executor(self._beats, self._forget)
        except Exception as exc:
            logger.warning("Could not delete the heartbeat of worker %s: %r", self.worker_id, exc)

    def _forget(self) -> None:
        heartbeats.forget(self._beat_instance or self.instance, self.worker_id)

    def _beat(self, holding: heartbeats.Beat) -> None:
        """On the heartbeat thread: the beat, through an instance (connections) of its own."""
        if self._beat_instance is None:
            self._beat_instance = own_instance(self.instance)
        heartbeats.beat(self._beat_instance, self.worker_id, holding)

    def _fence(self, why: str, only: HeldTask | None = None) -> None:
        """SIGKILL held work that another worker may be running now: no interrupt, as Dagster's
        run process would write the run's failure into a run that lives on elsewhere."""
        for held in [only] if only else list(self.held.values()):
            if held.fenced_because is not None:
                continue
            logger.critical("Killing task %s of run %s: %s", held.task_id, held.run_id, why)
            held.killed = True
            held.fenced_because = why
            asyncio.get_running_loop().create_task(stopping.kill(held))

    async def check_held(self) -> None:
        """One query for every held run (and every released one, ``_check_released``): its
        status and the task last sent for it; then act on what the authority says."""
        waiting = [h for h in self.held.values() if h.stop_started_at is None]
        released = [h for h in self.finishing.values() if h.phase == Phase.RELEASED]
        if not waiting and not released:
            return
        run_ids = {h.run_id for h in [*waiting, *released]}
        runs = await self._storage_call(held_runs, self.instance, run_ids)
        for held in waiting:
            run = runs.get(held.run_id)
            status = run.status if run else None
            sent = resent_as(held, run.sent if run else None)
            if sent is not None:
                self._fence(f"the run was sent again as task {sent} (a resume)", held)
                continue
            first_seen_started = (
                held.step_key is None
                and status == DagsterRunStatus.STARTED
                and not held.start_checked
            )
            if first_seen_started:
                overwritten = await self._storage_call(
                    reassert_if_overwritten, self.instance, self.worker_id, held.run_id
                )
                held.start_checked = True  # only once answered: an error asks again next poll
                if overwritten:
                    status = DagsterRunStatus.CANCELING
            if is_cancelled(status):
                await self._cancel(held)
            elif has_ended(status):
                await self._leave_to_finish(held, status)
        for held in released:
            await self._check_released(held, runs.get(held.run_id))

    async def _check_released(self, held: HeldTask, run: HeldRun | None) -> None:
        """A fenced run task, released: end its run CANCELED if a cancel landed since.

        Its process is gone and run monitoring resumes only STARTED runs, so nobody else would
        end the run; without this it would wait for the sensor's timeout. The task is done once
        its run was cancelled, ended, or moved on (resumed elsewhere).
        """
        moved_on = run is not None and resent_as(held, run.sent) is not None
        if run is not None and not moved_on and is_cancelled(run.status):
            recorded = await self._storage_call(
                cancel_released, self.instance, self.worker_id, held
            )
            held.cancel = True
            held.request = self._pending_requests.get(held.run_id)
            held.advance(Phase.SETTLED)
            if recorded:
                detail = f"killed earlier, as the worker {held.fenced_because}"
                ack = self._acks.send(held.run_id, None, held.task_id, "killed", detail, held)
                self._in_background(ack)
            self._done(held)
        elif run is None or run.status in FINISHED_STATUSES or moved_on:
            self._done(held)

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
            asyncio.get_running_loop().create_task(stopping.kill(held))
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
            ended = status.value if status else "or was deleted"
            await self._storage_call(
                records.note,
                self.instance,
                held.run_id,
                f"Worker {self.worker_id} is stopping task {held.task_id}: it was still running "
                f"{self.settings.grace_seconds:g}s after the run ended {ended}.",
                held.step_key,
            )
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
        notice = stopping.stop_seconds(held, "notice_seconds", self.settings, self.codec)
        grace = stopping.stop_seconds(held, "grace_seconds", self.settings, self.codec)
        logger.info(
            "Stopping task %s (pid %s): %s; notice %ss, grace %ss",
            held.task_id,
            held.process.pid,
            "run cancelled" if held.cancel else "not cancelled (run ended, or shutdown)",
            notice,
            grace,
        )
        # The interrupt first: announcing may fail (a full disk), and must not lose the stop.
        asyncio.get_running_loop().create_task(stopping.interrupt(held, notice, grace))
        if held.cancel:
            try:
                announce(held.cancel_file, held.stop_started_at + notice)
            except OSError as exc:
                logger.warning("Could not write the cancel deadline of %s: %s", held.task_id, exc)

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
        """Wake the poll if this worker answers for the request's run; else only count it."""
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
        if self._answers_for(request.run_id):
            logger.info("Cancel hint for held run %s from %s", request.run_id, queue)
            self._pending_requests[request.run_id] = request
            self._wake.set()
            metrics.cancel_request("woke")
            return
        # Silent: with competing consumers most receivers do not hold the run, and an answer
        # from each would be a fleet's worth of acks per cancel. The sensor learns of a run
        # nobody holds from the claims and heartbeats (``time_out_silent_cancels``).
        metrics.cancel_request("not_running")

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
        await asyncio.gather(*(h.exited.wait() for h in tasks))
        # One settle try, and one retry; a run the storage does not answer for is left to run
        # monitoring, which finds this worker's heartbeat stale once it has exited.
        settling = [asyncio.ensure_future(h.settled.wait()) for h in tasks]
        if settling:
            await asyncio.wait(settling, timeout=self._storage_timeout + self._settle_backoff_max)
        for waiting in settling:
            waiting.cancel()
        for held in tasks:
            if not held.settled.is_set():
                logger.error(
                    "Leaving task %s unsettled: the run storage does not answer", held.task_id
                )
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
        self._beats.shutdown(wait=False)
        if self._beat_instance not in (None, self.instance):
            with contextlib.suppress(Exception):
                close_connections(self._beat_instance)  # type: ignore[arg-type]
                self._beat_instance.dispose()  # type: ignore[union-attr]
        shutil.rmtree(self._cancel_dir, ignore_errors=True)


def _came(context: Context) -> str | None:
    """The queue a task came from, as the broker labelled it on receipt."""
    return context.message.labels.get(RECEIVED_FROM)


def own_instance(instance: DagsterInstance) -> DagsterInstance:
    """The same storage through an instance (so connections, pooled) of its own; an in-memory
    one as is."""
    if instance.is_ephemeral:
        return instance
    return pool_connections(DagsterInstance.from_ref(instance.get_ref()))


def resent_as(held: HeldTask, sent: claims.Sent | None) -> str | None:
    """The task id a held run task's run was sent again as (a resume elsewhere), if any."""
    task_id = sent.task_id if sent is not None else None
    return task_id if held.step_key is None and task_id not in (None, held.task_id) else None
