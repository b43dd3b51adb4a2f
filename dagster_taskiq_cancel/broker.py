"""CancellableSqsBroker: a small taskiq broker on SQS that never hoards and never busy-loops.

Unlike taskiq-aio-sqs (which buffers up to 100 messages and long-polls 1 s at a time), ``listen``
receives one message per request and only when taskiq's Receiver asks for the next one, which it
does only when a delivery slot is free (``max_async_tasks + max_prefetch``). Every receive
long-polls ``wait_time_seconds``. A failed SQS call is retried with backoff and logged once per
outage instead of ending the listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator
from typing import Any

import aioboto3
import botocore.exceptions
from botocore.config import Config as BotoConfig
from taskiq import AckableMessage, AsyncBroker, BrokerMessage

from dagster_taskiq_cancel.messages import codec_for
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
        self._stack = contextlib.AsyncExitStack()
        self._outage: str | None = None
        self._unacked: dict[str, str] = {}  # receipt handle -> task id, received not yet started
        self.released: set[str] = set()  # task ids handed back at shutdown: never start them

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

    def add_queue(self, name: str, url: str) -> None:
        """Receive from and delete on one more queue (this worker's hint queue)."""
        self._urls[name] = url

    async def shutdown(self) -> None:
        await self._stack.aclose()
        await super().shutdown()

    async def kick(self, message: BrokerMessage) -> None:
        await self.send(self.names.main, message.message.decode(), message.task_id, message.task_id)

    async def send(self, name: str, body: str, group_id: str, dedup_id: str) -> None:
        kwargs: dict[str, Any] = {"QueueUrl": self._urls[name], "MessageBody": body}
        if name.endswith(FIFO_SUFFIX):
            kwargs.update(MessageGroupId=group_id, MessageDeduplicationId=dedup_id)
        await self._client.send_message(**kwargs)

    async def send_until_sent(self, name: str, body: str, group_id: str, dedup_id: str) -> None:
        """``send``, retried with backoff until it succeeds or the caller is cancelled (shutdown).

        The same deduplication id on every try, so a send that did arrive is not doubled.
        """
        backoff = _BACKOFF_START
        while True:
            try:
                await self.send(name, body, group_id, dedup_id)
                return
            except _SQS_ERRORS as exc:
                logger.warning(
                    "Sending to %s failed, retrying in %ss: %s",
                    name,
                    backoff,
                    describe_client_error(exc, self.settings),
                )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX)

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
            logger.warning(
                "Could not delete a message from %s: %s",
                name,
                describe_client_error(exc, self.settings),
            )

    async def receive(
        self, name: str, max_messages: int, visibility_timeout: int | None = None
    ) -> list[dict[str, Any]]:
        """One long poll; on an SQS error, back off and retry until it answers."""
        kwargs: dict[str, Any] = {
            "QueueUrl": self._urls[name],
            "MaxNumberOfMessages": max_messages,
            "WaitTimeSeconds": self.settings.wait_time_seconds,
        }
        if visibility_timeout is not None:
            kwargs["VisibilityTimeout"] = visibility_timeout
        backoff = _BACKOFF_START
        while True:
            try:
                response = await self._client.receive_message(**kwargs)
            except _SQS_ERRORS as exc:
                self._report_outage(exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)
                continue
            if self._outage is not None:
                logger.warning("SQS answers again after: %s", self._outage)
                self._outage = None
            return response.get("Messages", [])

    def _report_outage(self, exc: BaseException) -> None:
        """Log the first failure of an outage only, so a long outage is one line, not thousands."""
        if self._outage is None:
            self._outage = describe_client_error(exc, self.settings)
            logger.warning("SQS receive failed, retrying with backoff: %s", self._outage)

    async def listen(self) -> AsyncGenerator[AckableMessage, None]:
        """Yield main-queue tasks one at a time; set aside what is not one of our tasks."""
        while True:
            messages = await self.receive(
                self.names.main, 1, visibility_timeout=self.settings.visibility_timeout_seconds
            )
            for message in messages:
                body = message.get("Body", "")
                receipt = message["ReceiptHandle"]
                reason = self.reject_reason(body)
                if reason is not None:
                    logger.warning(
                        "Deleting malformed task message %s: %s", message.get("MessageId"), reason
                    )
                    await self.delete(self.names.main, receipt)
                    continue
                self._unacked[receipt] = self.formatter.loads(body.encode()).task_id
                yield AckableMessage(
                    data=body.encode(),
                    ack=_Ack(self, self.names.main, receipt),
                )

    async def release_unstarted(self) -> int:
        """Hand every received, not yet started task back to the queue at once (visibility 0).

        Called when a worker shuts down: other workers take them now instead of after the
        visibility timeout, and this worker never starts them.
        """
        handed_back = 0
        for receipt, task_id in list(self._unacked.items()):
            self._unacked.pop(receipt, None)
            self.released.add(task_id)
            try:
                await self._client.change_message_visibility(
                    QueueUrl=self._urls[self.names.main], ReceiptHandle=receipt, VisibilityTimeout=0
                )
                handed_back += 1
            except _SQS_ERRORS as exc:
                logger.warning("Could not hand back task %s: %s", task_id, exc)
        return handed_back

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

    def __init__(self, broker: CancellableSqsBroker, name: str, receipt_handle: str) -> None:
        self.broker = broker
        self.name = name
        self.receipt_handle = receipt_handle

    async def __call__(self) -> None:
        if self.broker.settle(self.receipt_handle):
            await self.broker.delete(self.name, self.receipt_handle)
