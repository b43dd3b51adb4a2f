"""CancellableSqsBroker: a small taskiq broker on SQS that never hoards and never busy-loops.

Unlike taskiq-aio-sqs (which buffers up to 100 messages and long-polls 1 s at a time), ``listen``
receives one message per request and yields only when taskiq's Receiver asks for the next one,
which it does only when a delivery slot is free (``max_async_tasks + max_prefetch``). Every
receive long-polls ``wait_time_seconds``. A failed SQS call is retried with jittered backoff
(``backoff``) and logged once per outage instead of ending the listener.

A worker serving several task queues (pools, priority lanes) keeps one long poll open on each
and, when a slot frees, takes from the first queue in its order (high lanes first) that has a
task (``_next_message``): priority is decided when a slot frees, from what the queues hold then.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Mapping
from typing import Any

import aioboto3
import botocore.exceptions
from botocore.config import Config as BotoConfig
from taskiq import AckableMessage, AsyncBroker, BrokerMessage

from dagster_taskiq_cancel import metrics
from dagster_taskiq_cancel.backoff import Backoff
from dagster_taskiq_cancel.messages import MalformedMessage, codec_for
from dagster_taskiq_cancel.payloads import (
    MISSING_CODES,
    POINTER_ATTRIBUTES,
    S3_CONFIG,
    PayloadPointer,
    check_payload,
    plan_offload,
    read_pointer,
    too_large,
)
from dagster_taskiq_cancel.queues import (
    FIFO_SUFFIX,
    QueueNames,
    SqsError,
    boto_client_kwargs,
    describe_client_error,
)
from dagster_taskiq_cancel.routing import served_pools
from dagster_taskiq_cancel.settings import TaskiqCancelSettings
from dagster_taskiq_cancel.tasks import (
    RECEIVED_FROM,
    TASK_KWARGS,
    TASK_LABELS,
    expected_task_id,
    task_signing_payload,
)

logger = logging.getLogger(__name__)

_BACKOFF_START = 0.5
_BACKOFF_MAX = 10.0
_ANSWER_SLACK = 5.0  # beyond its wait time, for a long poll's answer to arrive
_SQS_ERRORS = (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, OSError)


class CancellableSqsBroker(AsyncBroker):
    """The task queues a worker serves, and the shared cancels and acks queues of its
    deployment, over one aioboto3 client."""

    def __init__(self, settings: TaskiqCancelSettings) -> None:
        super().__init__()
        self.settings = settings
        self.names = QueueNames.from_setting(settings.queue_name)
        # Served task queues, in the order taken: high lanes first (``routing``).
        self.task_queues = self.names.task_queues(served_pools(settings), settings.priority_lanes)
        self.codec = codec_for(settings)
        self._urls: dict[str, str] = {}
        self._client: Any = None
        self._s3: Any = None  # only with a large_payload_bucket
        self._stack = contextlib.AsyncExitStack()
        self._outage: str | None = None
        # receipt handle -> (task id, queue), received not yet started
        self._unacked: dict[str, tuple[str, str]] = {}
        self.released: set[str] = set()  # task ids handed back at shutdown: never start them
        # Per task queue: its poll in flight, and what a poll brought that is not yielded yet.
        self._receiving: dict[str, asyncio.Future[list[dict[str, Any]]]] = {}
        self._received: dict[str, list[dict[str, Any]]] = {q: [] for q in self.task_queues}
        self._closing = False

    async def startup(self) -> None:
        """Open the client and resolve every queue URL, failing with what to change."""
        await super().startup()
        session = aioboto3.Session()
        self._client = await self._stack.enter_async_context(
            session.client(
                "sqs",
                config=BotoConfig(retries={"max_attempts": 1}, connect_timeout=3, read_timeout=30),
                **boto_client_kwargs(self.settings),
            )
        )
        for name in dict.fromkeys([*self.names.all, *self.task_queues]):
            try:
                response = await self._client.get_queue_url(QueueName=name)
            except _SQS_ERRORS as exc:
                raise SqsError(
                    f"queue {name}: {describe_client_error(exc, self.settings)}"
                ) from exc
            self._urls[name] = response["QueueUrl"]
        bucket = self.settings.large_payload_bucket
        if bucket:
            self._s3 = await self._stack.enter_async_context(
                session.client("s3", config=S3_CONFIG, **boto_client_kwargs(self.settings))
            )
            try:
                await self._s3.head_bucket(Bucket=bucket)
            except _SQS_ERRORS as exc:
                raise SqsError(
                    f"large_payload_bucket {bucket}: {describe_client_error(exc, self.settings)}"
                ) from exc
        metrics.sqs_answered()

    def add_queue(self, name: str, url: str) -> None:
        """Receive from and delete on one more queue (this worker's hint queue)."""
        self._urls[name] = url

    async def shutdown(self) -> None:
        await self._stack.aclose()
        await super().shutdown()

    async def kick(self, message: BrokerMessage) -> None:
        await self.send(self.names.main, message.message.decode(), message.task_id, message.task_id)

    async def send(self, name: str, body: str, group_id: str, dedup_id: str) -> None:
        """Send one message; a task body over the large-payload threshold goes to S3 first."""
        kwargs: dict[str, Any] = {"QueueUrl": self._urls[name], "MessageBody": body}
        if name.endswith(FIFO_SUFFIX):
            kwargs.update(MessageGroupId=group_id, MessageDeduplicationId=dedup_id)
        offload = plan_offload(self.settings, name, body) if self.names.holds_tasks(name) else None
        if offload is not None:
            if self._s3 is None:  # startup() opens it whenever a bucket is set
                raise SqsError("the broker was not started")
            pointer = offload.pointer
            await self._s3.put_object(Bucket=pointer.bucket, Key=pointer.key, Body=offload.payload)
            kwargs.update(MessageBody=offload.body, MessageAttributes=offload.attributes)
        try:
            await self._client.send_message(**kwargs)
        except _SQS_ERRORS:
            metrics.sqs_error("send")
            raise

    async def send_until_sent(self, name: str, body: str, group_id: str, dedup_id: str) -> None:
        """``send``, retried with backoff until it succeeds or the caller is cancelled (shutdown).

        The same deduplication id on every try, so a send that did arrive is not doubled.
        """
        backoff = Backoff(_BACKOFF_START, _BACKOFF_MAX)
        while True:
            try:
                await self.send(name, body, group_id, dedup_id)
                return
            except _SQS_ERRORS as exc:
                wait = backoff.next()
                logger.warning(
                    "Sending to %s failed, retrying in %.1fs: %s",
                    name,
                    wait,
                    describe_client_error(exc, self.settings),
                )
            await asyncio.sleep(wait)

    async def delete(self, name: str, receipt_handle: str) -> None:
        """Delete one message; a failure is logged, never raised: the message only comes back.

        A stale receipt handle (the message was received again elsewhere) is an error on some SQS
        implementations and a no-op on others; a redelivered task is dropped as a duplicate and a
        cancel request is only a hint, so neither must end the loop that deletes it.
        """
        try:
            await self._client.delete_message(
                QueueUrl=self._urls[name], ReceiptHandle=receipt_handle
            )
        except _SQS_ERRORS as exc:
            metrics.sqs_error("delete")
            logger.warning(
                "Could not delete a message from %s: %s",
                name,
                describe_client_error(exc, self.settings),
            )

    async def receive(
        self,
        name: str,
        max_messages: int,
        visibility_timeout: int | None = None,
        attributes: tuple[str, ...] = (),
        wait: int | None = None,
    ) -> list[dict[str, Any]]:
        """One long poll (``wait`` seconds, default ``wait_time_seconds``); on an SQS error, back
        off and retry until it answers."""
        kwargs: dict[str, Any] = {
            "QueueUrl": self._urls[name],
            "MaxNumberOfMessages": max_messages,
            "WaitTimeSeconds": self.settings.wait_time_seconds if wait is None else wait,
            "AttributeNames": ["SentTimestamp"],  # for the queue-wait metric
        }
        if attributes:
            kwargs["MessageAttributeNames"] = list(attributes)
        if visibility_timeout is not None:
            kwargs["VisibilityTimeout"] = visibility_timeout
        backoff = Backoff(_BACKOFF_START, _BACKOFF_MAX)
        while True:
            try:
                response = await self._client.receive_message(**kwargs)
            except _SQS_ERRORS as exc:
                metrics.sqs_error("receive")
                self._report_outage(exc)
                await asyncio.sleep(backoff.next())
                continue
            if self._outage is not None:
                logger.warning("SQS answers again after: %s", self._outage)
                self._outage = None
            metrics.sqs_answered()
            return response.get("Messages", [])

    def _report_outage(self, exc: BaseException) -> None:
        """Log the first failure of an outage only, so a long outage is one line, not thousands."""
        if self._outage is None:
            self._outage = describe_client_error(exc, self.settings)
            logger.warning("SQS receive failed, retrying with backoff: %s", self._outage)

    async def listen(self) -> AsyncGenerator[AckableMessage, None]:
        """Yield tasks one at a time, from the first served queue that has one; set aside what
        is not one of our tasks.

        Each task carries the queue it came from as its ``RECEIVED_FROM`` label (added here,
        after validation: a sender's own labels are refused), for the worker's routing check.
        The long polls are tasks of their own, which taskiq's cancel at shutdown does not reach:
        SQS would keep an abandoned poll open for its wait time and hand it any task sent
        meanwhile, which would then stay invisible for the visibility timeout (a resume sent as
        this worker leaves, say).
        ``release_late`` waits for those answers and hands them back.
        """
        while not self._closing:
            queue, message = await self._next_message()
            if self._closing:
                # Handed back here as well as by ``release_late``, whichever saw it first.
                await self._hand_back({message["ReceiptHandle"]: ("", queue)})
                return
            receipt = message["ReceiptHandle"]
            try:
                body, pointer = await self._task_body(message)
            except MalformedMessage as exc:
                await self._set_aside(queue, message, str(exc))
                continue
            except _SQS_ERRORS as exc:
                logger.warning(
                    "Could not fetch the body of task message %s, left for redelivery: %s",
                    message.get("MessageId"),
                    describe_client_error(exc, self.settings),
                )
                continue
            except Exception as exc:  # no pointer may end the listener
                await self._set_aside(queue, message, f"unreadable S3 pointer ({exc!r:.200})")
                continue
            reason = self.reject_reason(body)
            if reason is not None:
                await self._set_aside(queue, message, reason)
                continue
            task = self.formatter.loads(body.encode())
            self._unacked[receipt] = (task.task_id, queue)
            metrics.task_received(task.task_name, message)
            task.labels[RECEIVED_FROM] = queue
            yield AckableMessage(
                data=self.formatter.dumps(task).message,
                ack=_Ack(self, queue, receipt, pointer),
            )

    async def _next_message(self) -> tuple[str, dict[str, Any]]:
        """The next message to take, and its queue: the first queue in order that has one.

        Called when a slot is free. Every queue but the last is looked at once, in order,
        without waiting (an open long poll is not trusted to have answered: some SQS servers
        wake it only at its wait time); the last needs no look, its long poll answers at once.
        Then every queue has a long poll open, and the first answer decides. So taking a task
        costs at most one short receive per queue before the last, an idle worker makes one
        request per queue per wait time, and it holds at most one received message per queue
        beyond its slots (when several polls answer at once).
        """
        look = True
        while True:
            for queue, polling in list(self._receiving.items()):
                if polling.done():
                    del self._receiving[queue]
                    self._received[queue].extend(polling.result())
            for queue in self.task_queues:
                if not self._received[queue] and look and queue != self.task_queues[-1]:
                    self._received[queue].extend(await self._receive_task(queue, wait=0))
                if self._received[queue]:
                    return queue, self._received[queue].pop(0)
            look = False
            for queue in self.task_queues:
                if queue not in self._receiving:
                    self._receiving[queue] = asyncio.ensure_future(self._receive_task(queue))
            # Cancelling this wait (taskiq's shutdown) leaves the polls open for ``release_late``.
            await asyncio.wait(set(self._receiving.values()), return_when=asyncio.FIRST_COMPLETED)

    async def _receive_task(self, queue: str, wait: int | None = None) -> list[dict[str, Any]]:
        return await self.receive(
            queue,
            1,
            visibility_timeout=self.settings.visibility_timeout_seconds,
            attributes=POINTER_ATTRIBUTES,
            wait=wait,
        )

    async def _set_aside(self, queue: str, message: dict[str, Any], reason: str) -> None:
        """Log a task message that is not one of ours with its id, and delete it."""
        logger.warning("Deleting malformed task message %s: %s", message.get("MessageId"), reason)
        metrics.task_rejected()
        await self.delete(queue, message["ReceiptHandle"])

    async def _task_body(self, message: dict[str, Any]) -> tuple[str, PayloadPointer | None]:
        """The task body of ``message``: the message body, or the S3 object it points to.

        ``MalformedMessage`` when the message must be set aside (bad or foreign pointer, object
        missing or not a body); an SQS/S3 error when it should come back later.
        """
        body = message.get("Body", "")
        attributes = message.get("MessageAttributes") or {}
        pointer = read_pointer(body, attributes, self.settings.large_payload_bucket)
        if pointer is None:
            return body, None
        try:
            response = await self._s3.get_object(Bucket=pointer.bucket, Key=pointer.key)
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in MISSING_CODES:
                raise MalformedMessage(
                    f"{pointer.url} does not exist (already run and deleted, or never written)"
                ) from None
            raise
        async with response["Body"] as stream:
            rejection = too_large(pointer, int(response.get("ContentLength", 0)))
            if rejection is not None:
                raise rejection
            payload = await stream.read()
        return check_payload(pointer, payload), pointer

    async def delete_payload(self, pointer: PayloadPointer) -> None:
        """Delete a task body from S3 once its message is gone; a failure is only logged."""
        try:
            await self._s3.delete_object(Bucket=pointer.bucket, Key=pointer.key)
        except _SQS_ERRORS as exc:
            logger.warning(
                "Could not delete %s (an S3 lifecycle rule will): %s",
                pointer.url,
                describe_client_error(exc, self.settings),
            )

    async def release_unstarted(self) -> int:
        """Hand every received, not yet started task back to the queue at once (visibility 0).

        Called when a worker shuts down: other workers take them now instead of after the
        visibility timeout, and this worker never starts them.
        """
        self._closing = True
        unacked, self._unacked = self._unacked, {}
        return await self._hand_back(unacked)

    async def release_late(self) -> int:
        """After ``release_unstarted``: wait for the task-queue polls the shutdown cut short (at
        most their wait time) and hand back what they bring, with what they brought before."""
        answers = await asyncio.gather(*(self._answer_of(q, f) for q, f in self._receiving.items()))
        self._receiving = {}
        for queue, messages in answers:
            self._received[queue].extend(messages)
        late = {}
        for queue, messages in self._received.items():
            for message in messages:
                body = message.get("Body", "")
                # A malformed one is handed back too, for the next receiver to set aside.
                task_id = (
                    "" if self.reject_reason(body) else self.formatter.loads(body.encode()).task_id
                )
                late[message["ReceiptHandle"]] = (task_id, queue)
            messages.clear()
        handed_back = await self._hand_back(late)
        if handed_back:
            logger.info("Handed %d task(s) of the last poll back to the queue", handed_back)
        return handed_back

    async def _hand_back(self, messages: Mapping[str, tuple[str, str]]) -> int:
        """Make these messages (receipt handle -> task id, queue) visible again at once."""
        handed_back = 0
        for receipt, (task_id, queue) in messages.items():
            if task_id:
                self.released.add(task_id)
            try:
                await self._client.change_message_visibility(
                    QueueUrl=self._urls[queue], ReceiptHandle=receipt, VisibilityTimeout=0
                )
                handed_back += 1
            except _SQS_ERRORS as exc:
                metrics.sqs_error("change_visibility")
                logger.warning("Could not hand back task %s: %s", task_id, exc)
        return handed_back

    async def _answer_of(
        self, queue: str, receiving: asyncio.Future[list[dict[str, Any]]]
    ) -> tuple[str, list[dict[str, Any]]]:
        """The messages of a poll cut short by the shutdown; none if SQS does not answer."""
        try:
            await asyncio.wait({receiving}, timeout=self.settings.wait_time_seconds + _ANSWER_SLACK)
        finally:
            receiving.cancel()  # no-op once answered; else it would retry past the shutdown
        if receiving.cancelled() or receiving.exception() is not None:
            logger.warning("The poll of %s cut short by the shutdown did not answer", queue)
            return queue, []
        return queue, receiving.result()

    def settle(self, receipt_handle: str) -> bool:
        """Whether a starting task's message should be deleted (False once handed back)."""
        return self._unacked.pop(receipt_handle, None) is not None

    def reject_reason(self, body: str) -> str | None:
        """Why ``body`` is not one of our tasks, or None if it is.

        Checked before a slot is used, so that bad input is logged with its SQS message id and
        deleted here instead of failing (or steering taskiq through labels) inside the Receiver.
        Passing here only means well formed (and signed, with a key): the worker still runs
        nothing the run storage does not name.
        """
        try:
            task_message = self.formatter.loads(body.encode())
        except Exception as exc:
            return f"not a taskiq message ({type(exc).__name__})"
        name, kwargs = task_message.task_name, task_message.kwargs
        expected = TASK_KWARGS.get(name)
        if expected is None:
            return f"unknown task name {name!r}"
        if task_message.args or kwargs.keys() != expected:
            return f"{name} takes only the keyword arguments {sorted(expected)}"
        if not all(isinstance(value, str) for value in kwargs.values()):
            return f"{name} takes only strings"
        if not all(_utf8(value) for value in (task_message.task_id, *kwargs.values())):
            return "ids must be valid UTF-8 (a lone surrogate)"  # no storage could hold them
        labels = task_message.labels
        if not labels.keys() <= TASK_LABELS or task_message.labels_types:
            return f"unexpected labels {sorted(labels)}"
        if not all(isinstance(value, str) for value in labels.values()):
            return "labels must be strings"
        if task_message.task_id != expected_task_id(name, kwargs):
            return f"task id {task_message.task_id!r} does not match its arguments"
        payload = task_signing_payload(name, task_message.task_id, kwargs)
        return self.codec.mac_error(payload, labels.get("mac"))


class _Ack:
    """Deletes one received message; a callable object so it stays picklable and printable."""

    def __init__(
        self,
        broker: CancellableSqsBroker,
        name: str,
        receipt_handle: str,
        pointer: PayloadPointer | None = None,
    ) -> None:
        self.broker = broker
        self.name = name
        self.receipt_handle = receipt_handle
        self.pointer = pointer

    async def __call__(self) -> None:
        """Delete the message, then the S3 body it pointed to (no copy can need it now)."""
        if self.broker.settle(self.receipt_handle):
            await self.broker.delete(self.name, self.receipt_handle)
            if self.pointer is not None:
                await self.broker.delete_payload(self.pointer)


def _utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True
