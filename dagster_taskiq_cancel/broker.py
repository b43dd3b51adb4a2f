"""CancellableSqsBroker: a small taskiq broker on SQS that never hoards and never busy-loops.

Unlike taskiq-aio-sqs (which buffers up to 100 messages and long-polls 1 s at a time), ``listen``
receives one message per request and only when taskiq's Receiver asks for the next one, which it
does only when a delivery slot is free (``max_async_tasks + max_prefetch``). Every receive
long-polls ``wait_time_seconds``. A failed SQS call is retried with jittered backoff
(``backoff``) and logged once per outage instead of ending the listener.
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
from dagster_taskiq_cancel.settings import TaskiqCancelSettings
from dagster_taskiq_cancel.tasks import (
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
    """The main, cancels and acks queues of one deployment, over one aioboto3 client."""

    def __init__(self, settings: TaskiqCancelSettings) -> None:
        super().__init__()
        self.settings = settings
        self.names = QueueNames.from_setting(settings.queue_name)
        self.codec = codec_for(settings)
        self._urls: dict[str, str] = {}
        self._client: Any = None
        self._s3: Any = None  # only with a large_payload_bucket
        self._stack = contextlib.AsyncExitStack()
        self._outage: str | None = None
        self._unacked: dict[str, str] = {}  # receipt handle -> task id, received not yet started
        self.released: set[str] = set()  # task ids handed back at shutdown: never start them
        self._receiving: asyncio.Future[list[dict[str, Any]]] | None = None  # main-queue poll
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
        for name in self.names.all:
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
        offload = plan_offload(self.settings, name, body) if name == self.names.main else None
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
    ) -> list[dict[str, Any]]:
        """One long poll; on an SQS error, back off and retry until it answers."""
        kwargs: dict[str, Any] = {
            "QueueUrl": self._urls[name],
            "MaxNumberOfMessages": max_messages,
            "WaitTimeSeconds": self.settings.wait_time_seconds,
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
        """Yield main-queue tasks one at a time; set aside what is not one of our tasks.

        The long poll is shielded: taskiq cancels it at shutdown, but SQS keeps an abandoned
        poll open for its wait time and hands it any task sent meanwhile, which then stays
        invisible for the visibility timeout (a resume sent as this worker leaves, say).
        ``release_late`` waits for that answer and hands it back.
        """
        while not self._closing:
            receiving = self._receiving = asyncio.ensure_future(
                self.receive(
                    self.names.main,
                    1,
                    visibility_timeout=self.settings.visibility_timeout_seconds,
                    attributes=POINTER_ATTRIBUTES,
                )
            )
            messages = await asyncio.shield(receiving)
            if self._closing:
                return  # release_late hands these back
            self._receiving = None
            for message in messages:
                receipt = message["ReceiptHandle"]
                try:
                    body, pointer = await self._task_body(message)
                except MalformedMessage as exc:
                    await self._set_aside(message, str(exc))
                    continue
                except _SQS_ERRORS as exc:
                    logger.warning(
                        "Could not fetch the body of task message %s, left for redelivery: %s",
                        message.get("MessageId"),
                        describe_client_error(exc, self.settings),
                    )
                    continue
                except Exception as exc:  # no pointer may end the listener
                    await self._set_aside(message, f"unreadable S3 pointer ({exc!r:.200})")
                    continue
                reason = self.reject_reason(body)
                if reason is not None:
                    await self._set_aside(message, reason)
                    continue
                task = self.formatter.loads(body.encode())
                self._unacked[receipt] = task.task_id
                metrics.task_received(task.task_name, message)
                yield AckableMessage(
                    data=body.encode(),
                    ack=_Ack(self, self.names.main, receipt, pointer),
                )

    async def _set_aside(self, message: dict[str, Any], reason: str) -> None:
        """Log a task message that is not one of ours with its id, and delete it."""
        logger.warning("Deleting malformed task message %s: %s", message.get("MessageId"), reason)
        metrics.task_rejected()
        await self.delete(self.names.main, message["ReceiptHandle"])

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
        """After ``release_unstarted``: wait for the main-queue poll the shutdown cut short (at
        most its wait time) and hand back what it brings."""
        late = {}
        for message in await self._answer_of(self._receiving):
            body = message.get("Body", "")
            # A malformed one is handed back too, for the next receiver to set aside.
            task_id = (
                "" if self.reject_reason(body) else self.formatter.loads(body.encode()).task_id
            )
            late[message["ReceiptHandle"]] = task_id
        self._receiving = None
        handed_back = await self._hand_back(late)
        if handed_back:
            logger.info("Handed %d task(s) of the last poll back to the queue", handed_back)
        return handed_back

    async def _hand_back(self, messages: Mapping[str, str]) -> int:
        """Make these main-queue messages (receipt handle -> task id) visible again at once."""
        handed_back = 0
        for receipt, task_id in messages.items():
            if task_id:
                self.released.add(task_id)
            try:
                await self._client.change_message_visibility(
                    QueueUrl=self._urls[self.names.main], ReceiptHandle=receipt, VisibilityTimeout=0
                )
                handed_back += 1
            except _SQS_ERRORS as exc:
                metrics.sqs_error("change_visibility")
                logger.warning("Could not hand back task %s: %s", task_id, exc)
        return handed_back

    async def _answer_of(
        self, receiving: asyncio.Future[list[dict[str, Any]]] | None
    ) -> list[dict[str, Any]]:
        """The messages of a poll cut short by the shutdown; none if SQS does not answer."""
        if receiving is None:
            return []
        try:
            await asyncio.wait({receiving}, timeout=self.settings.wait_time_seconds + _ANSWER_SLACK)
        finally:
            receiving.cancel()  # no-op once answered; else it would retry past the shutdown
        if receiving.cancelled() or receiving.exception() is not None:
            logger.warning("The main-queue poll cut short by the shutdown did not answer")
            return []
        return receiving.result()

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
