"""TaskiqStepHandler: each Dagster step becomes a taskiq task on its pool's SQS queue.

The step runs on whichever worker receives it, as ``dagster api execute_step`` in a child
process, so that the worker can stop it when the run storage says its run is no longer live.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping

from dagster import DagsterRun
from dagster._core.events import DagsterEvent
from dagster._core.execution.plan.outputs import StepOutputHandle
from dagster._core.execution.plan.state import KnownExecutionState, PastExecutionState
from dagster._core.execution.plan.step import ExecutionStep
from dagster._core.executor.step_delegating import (
    CheckStepHealthResult,
    StepHandler,
    StepHandlerContext,
)
from dagster._serdes import serialize_value

from dagster_taskiq_cancel import claims, heartbeats, hints
from dagster_taskiq_cancel.messages import CancelRequest, codec_for
from dagster_taskiq_cancel.queues import SqsError, SyncQueues
from dagster_taskiq_cancel.routing import run_pool, task_queue
from dagster_taskiq_cancel.settings import TaskiqCancelSettings
from dagster_taskiq_cancel.tasks import QUEUE_TAG, step_task_id, step_task_message

logger = logging.getLogger(__name__)


def _step_key(context: StepHandlerContext) -> str:
    """The one step this context is about: the step-delegating executor launches one at a time."""
    step_keys = context.execute_step_args.step_keys_to_execute
    if step_keys is None or len(step_keys) != 1:
        raise ValueError(f"TaskiqStepHandler handles exactly one step per task, got {step_keys}")
    return step_keys[0]


def _attempt(context: StepHandlerContext, step_key: str) -> int:
    """Retries already made of this step: part of the task id, so a retry is a new task."""
    known_state = context.execute_step_args.known_state
    return known_state.get_retry_state().get_attempt_count(step_key) if known_state else 0


def _past_for(
    past: PastExecutionState | None, inputs: frozenset[StepOutputHandle]
) -> PastExecutionState | None:
    """The parent runs' chain, each listing only those of its outputs the step reads."""
    if past is None:
        return None
    parent = _past_for(past.get_parent_state(), inputs)
    return PastExecutionState(past.run_id, past.produced_outputs & inputs, parent)


def _state_for_step(context: StepHandlerContext, step: ExecutionStep, attempt: int) -> str:
    """The executor's known state as this one step needs it, serialized for its launch record.

    The executor's state lists every output the run (and each parent run) produced so far, so
    it grows with the run; a step reads only its own inputs' (``ready_outputs``, each parent's
    ``produced_outputs``) and its own retry count, so the record keeps just those, and its size
    stays the same at the run's first step and its thousandth. Dynamic mappings are kept whole:
    Dagster's step process resolves its plan from them.
    """
    known = context.execute_step_args.known_state or KnownExecutionState()
    inputs = frozenset(
        handle
        for step_input in step.step_inputs
        for handle in step_input.get_step_output_handle_dependencies()
    )
    state = KnownExecutionState(
        previous_retry_attempts={step.key: attempt},
        dynamic_mappings=known.dynamic_mappings,
        step_output_versions=known.step_output_versions,
        ready_outputs=known.ready_outputs & inputs,
        parent_state=_past_for(known.parent_state, inputs),
    )
    return serialize_value(state)


class TaskiqStepHandler(StepHandler):
    """Sends steps to the workers and asks them to check a run at once on terminate.

    One ``SyncQueues`` per handler: its boto3 client and queue URLs are reused for every step of
    the run.
    """

    def __init__(self, settings: TaskiqCancelSettings) -> None:
        super().__init__()
        self.queues = SyncQueues(settings)
        self.codec = codec_for(settings)
        # When this run process sent each step task (or, after a resume, first checked it).
        self._sent: dict[str, float] = {}
        self._queues: dict[str, str] = {}  # the queue each step task was sent to

    @property
    def name(self) -> str:
        return "TaskiqStepHandler"

    def launch_step(self, step_handler_context: StepHandlerContext) -> Iterator[DagsterEvent]:
        """Record the launch in the run's event log (for people) and in the run storage's
        key-value table (``claims.record_launch``, for the workers), then send the task that
        names it.

        Both are written before the send: a worker runs a step only when its launch record
        names the task, so a task that nobody launched never runs, and the record holds the
        state the step starts from, so that admitting it reads one row however large the run.
        """
        step_key = _step_key(step_handler_context)
        run_id = step_handler_context.execute_step_args.run_id
        attempt = _attempt(step_handler_context, step_key)
        message = step_task_message(run_id, step_key, attempt, self.codec)
        step_context = step_handler_context.get_step_context(step_key)
        queue = self._queue(step_handler_context.dagster_run, step_context.step.tags)
        event = DagsterEvent.step_worker_starting(
            step_context,
            message=f"Sending step {step_key} to SQS queue {queue} as task {message.task_id}.",
            metadata={"queue": queue, "task_id": message.task_id},
        )
        state = _state_for_step(step_handler_context, step_context.step, attempt)
        claims.record_launch(step_handler_context.instance, message.task_id, state, queue)
        self.queues.send(queue, message.body, group_id=message.task_id, dedup_id=message.task_id)
        self._sent[message.task_id] = time.time()
        self._queues[message.task_id] = queue
        yield event

    def _queue(self, run: DagsterRun, step_tags: Mapping[str, str]) -> str:
        """The step's queue: its op's ``dagster-taskiq/queue`` tag, else its run's pool; the lane
        from the op's ``dagster/priority``, else the run's (``routing``)."""
        pool = step_tags.get(QUEUE_TAG) or run_pool(run, self.queues.settings)
        return task_queue(self.queues.names, self.queues.settings, pool, step_tags, run.tags)

    def check_step_health(self, step_handler_context: StepHandlerContext) -> CheckStepHealthResult:
        """Unhealthy once the step's task is lost, so that the executor fails (or retries) the
        step instead of waiting for it forever, as dagster-docker and dagster-k8s answer from
        the container or Job.

        Lost means: the worker that claimed the task (``claims``) has a stale heartbeat (it
        died, and the step's processes with it) or beats without listing the task
        (``heartbeats.why_lost``), or no worker claimed the task within
        ``step_claim_timeout_seconds`` of its sending (a lost message, no worker on the queue).
        Two run-storage reads per running step and check; SQS is not asked.
        """
        args = step_handler_context.execute_step_args
        step_key = _step_key(step_handler_context)
        task_id = step_task_id(args.run_id, step_key, _attempt(step_handler_context, step_key))
        settings = self.queues.settings
        instance = step_handler_context.instance
        claim = claims.claim_of(instance, task_id)
        if claim is None:
            waited = time.time() - self._sent.setdefault(task_id, time.time())
            if waited <= settings.step_claim_timeout_seconds:
                return CheckStepHealthResult.healthy()
            return CheckStepHealthResult.unhealthy(
                f"step task {task_id} was never claimed within "
                f"{settings.step_claim_timeout_seconds:g}s (step_claim_timeout_seconds): "
                "is a worker serving queue "
                f"{self._queues.get(task_id, 'of its pool')}?"
            )
        lost = heartbeats.why_lost(instance, claim, settings.heartbeat_timeout_seconds)
        if lost is None:
            return CheckStepHealthResult.healthy()
        return CheckStepHealthResult.unhealthy(f"step task {lost}")

    def terminate_step(self, step_handler_context: StepHandlerContext) -> Iterator[DagsterEvent]:
        """Hint the step's holder (its own hint queue) and the shared queue to check the run
        now; a failed send only delays the stop.

        The executor calls this after the run became CANCELING, so each worker's next poll (the
        backstop, ``poll_interval_seconds``) stops the step even if these messages are lost.
        """
        args = step_handler_context.execute_step_args
        run_id, step_key = args.run_id, _step_key(step_handler_context)
        request = CancelRequest(run_id=run_id, step_key=step_key, reason="terminate step")
        body = self.codec.dumps(request)
        task_id = step_task_id(run_id, step_key, _attempt(step_handler_context, step_key))
        try:
            claim = claims.claim_of(step_handler_context.instance, task_id)
        except Exception as exc:  # only the fast path is lost: the shared queue and the poll stay
            logger.warning("Could not read who holds step %s to hint: %s", step_key, exc)
            claim = None
        if claim is not None:
            entry = (step_handler_context.dagster_run, body, request.request_id)
            hints.send_to_holders(self.queues, [entry], {run_id: claim.worker_id})
        try:
            self.queues.send(
                self.queues.names.cancels, body, group_id=run_id, dedup_id=request.request_id
            )
        except SqsError as exc:
            logger.warning(
                "Cancel message for step %s of run %s not sent (%s); the poll will stop it",
                step_key,
                run_id,
                exc,
            )
        yield from ()
