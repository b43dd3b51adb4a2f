"""The queues of one deployment, their names, and the synchronous SQS calls on them.

Three queues are shared by every pool: the main queue (the default pool's tasks), cancels and
acks. Each further pool has a task queue of its own, ``{base}-{pool}`` (``pool_queue``), and with
priority lanes each task queue a high lane beside it (``lane_queue``).

The launcher, the step handler, the sensor and the CLI run in synchronous code (the webserver
even inside a running event loop), so they use plain boto3 here; only the worker is async.
"""

from __future__ import annotations

import functools
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import boto3
import botocore.exceptions
from botocore.config import Config as BotoConfig

from dagster_taskiq_cancel.local_sqs import LOCAL_CREDENTIALS
from dagster_taskiq_cancel.payloads import S3_CONFIG, plan_offload
from dagster_taskiq_cancel.settings import TaskiqCancelSettings, endpoint_for, is_local

FIFO_SUFFIX = ".fifo"
# The pool of the main queue: what routes to it, and what ``worker`` serves without ``--queue``.
DEFAULT_POOL = "default"
HIGH_LANE = "-high"
_POOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,40}")
# Pool names whose queue would be one of the shared queues, a hint queue or a high lane.
_RESERVED_POOLS = frozenset({"cancels", "cancel-acks"})


class SqsError(RuntimeError):
    """SQS cannot be used as configured; the message says what to change."""


@dataclass(frozen=True)
class QueueNames:
    """Main, cancels and acks queue names derived from one configured name or URL."""

    main: str
    cancels: str
    acks: str

    @property
    def fifo(self) -> bool:
        return self.main.endswith(FIFO_SUFFIX)

    @property
    def all(self) -> tuple[str, str, str]:
        return (self.main, self.cancels, self.acks)

    @classmethod
    def from_setting(cls, queue_name: str) -> QueueNames:
        name = queue_name.rstrip("/").rsplit("/", 1)[-1]
        if not name:
            raise SqsError(f"queue_name {queue_name!r} has no queue name in it")
        base, suffix = (
            (name[: -len(FIFO_SUFFIX)], FIFO_SUFFIX) if name.endswith(FIFO_SUFFIX) else (name, "")
        )
        return cls(main=name, cancels=f"{base}-cancels{suffix}", acks=f"{base}-cancel-acks{suffix}")

    def _split(self, name: str) -> tuple[str, str]:
        suffix = FIFO_SUFFIX if self.fifo else ""
        return (name[: -len(suffix)] if suffix else name), suffix

    def pool_queue(self, pool: str) -> str:
        """The task queue of ``pool``: the main queue for the default pool, else
        ``{base}-{pool}`` (``.fifo`` kept at the end); ``SqsError`` for a name SQS or the shared
        queues forbid.

        The main queue's own name is also the default pool, so that a run tagged by an earlier
        version (which wrote the queue name into ``dagster-taskiq/queue``) routes as before.
        """
        if pool in (DEFAULT_POOL, self.main):
            return self.main
        if (
            not _POOL_NAME.fullmatch(pool)
            or pool in _RESERVED_POOLS
            or pool.startswith("w-")
            or pool.endswith(HIGH_LANE)
        ):
            raise SqsError(
                f"{pool!r} is not a usable pool name: use up to 40 letters, digits, '-' or '_', "
                f"not cancels, cancel-acks, w-… or …{HIGH_LANE} (they name other queues)"
            )
        base, suffix = self._split(self.main)
        return f"{base}-{pool}{suffix}"

    def holds_tasks(self, name: str) -> bool:
        """Whether ``name`` is a task queue (whose bodies may go to S3), not a queue of cancel
        requests (shared or a worker's ``{base}-w-…``) or acks."""
        return name not in (self.cancels, self.acks) and not name.startswith(
            self._split(self.main)[0] + "-w-"
        )

    def lane_queue(self, queue: str, high: bool) -> str:
        """The queue of a task queue's lane: itself for the normal lane, ``{queue}-high`` for
        the high one (``.fifo`` kept at the end)."""
        if not high:
            return queue
        base, suffix = self._split(queue)
        return f"{base}{HIGH_LANE}{suffix}"

    def task_queues(self, pools: Sequence[str], lanes: bool) -> tuple[str, ...]:
        """The task queues of ``pools``, every high lane before the normal lanes: the order a
        worker takes work in."""
        queues = [self.pool_queue(pool) for pool in pools]
        if not lanes:
            return tuple(dict.fromkeys(queues))
        ordered = [self.lane_queue(q, high) for high in (True, False) for q in queues]
        return tuple(dict.fromkeys(ordered))


def local_credentials(endpoint_url: str | None) -> dict[str, str]:
    """Dummy credentials for a server on this machine when the environment names none.

    Local SQS servers (moto, ministack) accept any credentials, but boto refuses to send a request
    without some: a new user's first `make dev` or `queues create` against 127.0.0.1 should not
    need AWS variables. Credentials from the environment, or a profile, are always used as given.
    """
    if (
        not is_local(endpoint_url)
        or os.environ.get("AWS_ACCESS_KEY_ID")
        or os.environ.get("AWS_PROFILE")
    ):
        return {}
    return {
        "aws_access_key_id": LOCAL_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": LOCAL_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    }


def boto_client_kwargs(settings: TaskiqCancelSettings) -> dict[str, Any]:
    """Keyword arguments shared by the boto3 and aioboto3 clients (SQS, and S3 in tests)."""
    endpoint = endpoint_for(settings)
    return {
        "region_name": settings.region_name,
        "endpoint_url": endpoint,
        **local_credentials(endpoint),
    }


def describe_client_error(exc: BaseException, settings: TaskiqCancelSettings) -> str:
    """A one-line reason with the fix, for the errors users meet first."""
    where = endpoint_for(settings) or f"AWS SQS in {settings.region_name}"
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        return (
            "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or "
            "AWS_PROFILE (a server on 127.0.0.1 needs none)"
        )
    if isinstance(exc, botocore.exceptions.EndpointConnectionError):
        return f"cannot reach {where}: check endpoint_url (DAGSTER_TASKIQ_ENDPOINT_URL)"
    if isinstance(exc, botocore.exceptions.ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        if "NonExistentQueue" in code or "QueueDoesNotExist" in code:
            return (
                f"queue does not exist at {where}: run `dagster-taskiq-cancel queues create` "
                "with the same settings"
            )
        return f"{code or 'error'} from {where}: {exc}"
    return f"{type(exc).__name__} talking to {where}: {exc}"


class SyncQueues:
    """Blocking access to the three queues; queue URLs are resolved once and cached."""

    def __init__(self, settings: TaskiqCancelSettings) -> None:
        self.settings = settings
        self.names = QueueNames.from_setting(settings.queue_name)
        self._urls: dict[str, str] = {}

    @functools.cached_property
    def client(self) -> Any:
        return boto3.client(
            "sqs",
            config=BotoConfig(retries={"max_attempts": 2}, connect_timeout=3, read_timeout=30),
            **boto_client_kwargs(self.settings),
        )

    def call(self, method: str, **kwargs: Any) -> Any:
        """Call an SQS API, turning boto's errors into an ``SqsError`` that says what to fix."""
        try:
            return getattr(self.client, method)(**kwargs)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise SqsError(describe_client_error(exc, self.settings)) from exc

    def url(self, name: str) -> str:
        if name not in self._urls:
            self._urls[name] = self.call("get_queue_url", QueueName=name)["QueueUrl"]
        return self._urls[name]

    @functools.cached_property
    def s3(self) -> Any:
        """The client for task bodies too large for SQS (``payloads``), made on first use."""
        return boto3.client("s3", config=S3_CONFIG, **boto_client_kwargs(self.settings))

    def remember_url(self, name: str, url: str) -> None:
        """Use ``url`` for ``name`` without asking SQS (a URL derived or just created)."""
        self._urls.setdefault(name, url)

    def send(self, name: str, body: str, group_id: str, dedup_id: str) -> str:
        """Send one message; FIFO queues get the per-task group and per-request dedup ids.

        A task body over the large-payload threshold goes to S3 first, the message points to it.
        """
        kwargs: dict[str, Any] = {"QueueUrl": self.url(name), "MessageBody": body}
        offload = plan_offload(self.settings, name, body) if self.names.holds_tasks(name) else None
        if offload is not None:
            pointer = offload.pointer
            try:
                self.s3.put_object(Bucket=pointer.bucket, Key=pointer.key, Body=offload.payload)
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
                raise SqsError(
                    f"could not store a task body at {pointer.url}: "
                    f"{describe_client_error(exc, self.settings)}"
                ) from exc
            kwargs.update(MessageBody=offload.body, MessageAttributes=offload.attributes)
        if name.endswith(FIFO_SUFFIX):
            kwargs.update(MessageGroupId=group_id, MessageDeduplicationId=dedup_id)
        return self.call("send_message", **kwargs)["MessageId"]

    def send_batch(self, name: str, entries: list[tuple[str, str, str]]) -> list[str]:
        """Send (body, group id, dedup id) entries, ten per request; returns failure reasons."""
        failures: list[str] = []
        fifo = name.endswith(FIFO_SUFFIX)
        for start in range(0, len(entries), 10):
            chunk = []
            for index, (body, group_id, dedup_id) in enumerate(entries[start : start + 10]):
                entry: dict[str, Any] = {"Id": str(index), "MessageBody": body}
                if fifo:
                    entry.update(MessageGroupId=group_id, MessageDeduplicationId=dedup_id)
                chunk.append(entry)
            result = self.call("send_message_batch", QueueUrl=self.url(name), Entries=chunk)
            failures.extend(
                f"{f.get('Code')}: {f.get('Message')}" for f in result.get("Failed", [])
            )
        return failures

    @property
    def task_queue_names(self) -> tuple[str, ...]:
        """The main queue, then the task queues of the pools in ``serve_queues`` (the admin
        commands' ``--queue``), with their high lanes when ``priority_lanes`` is on."""
        pools = [DEFAULT_POOL, *self.settings.serve_queues.split(",")]
        return self.names.task_queues(
            [p.strip() for p in pools if p.strip()], self.settings.priority_lanes
        )

    @property
    def every_name(self) -> tuple[str, ...]:
        """The shared queues and ``task_queue_names``: what the admin commands act on."""
        return tuple(dict.fromkeys([*self.names.all, *self.task_queue_names]))

    def create_all(self) -> dict[str, str]:
        """Create the shared queues and the pools' (``every_name``) if missing (idempotent);
        returns name → URL."""
        for name in self.every_name:
            attributes = {"FifoQueue": "true"} if self.names.fifo else {}
            self._urls[name] = self.call("create_queue", QueueName=name, Attributes=attributes)[
                "QueueUrl"
            ]
        return dict(self._urls)

    def purge_all(self) -> None:
        for name in self.every_name:
            self.call("purge_queue", QueueUrl=self.url(name))

    def depths(self) -> dict[str, dict[str, int]]:
        """Visible and in-flight message counts per queue (``every_name``)."""
        counts = {}
        for name in self.every_name:
            attrs = self.call(
                "get_queue_attributes",
                QueueUrl=self.url(name),
                AttributeNames=[
                    "ApproximateNumberOfMessages",
                    "ApproximateNumberOfMessagesNotVisible",
                ],
            )["Attributes"]
            counts[name] = {
                "visible": int(attrs["ApproximateNumberOfMessages"]),
                "in_flight": int(attrs["ApproximateNumberOfMessagesNotVisible"]),
            }
        return counts


def backlog_figures(depth: dict[str, int], slots_per_replica: int) -> dict[str, float | int]:
    """A task queue's backlog in the units autoscalers use, for ``queues status``.

    Tasks are deleted when they start, so the backlog is waiting work only (visible, plus
    received not yet started): ``backlog_per_slot`` is that over one replica's slots, and
    ``replicas_for_backlog`` its ceiling, which is what KEDA computes with
    ``queueLength = slots_per_replica``.
    """
    backlog = depth["visible"] + depth["in_flight"]
    return {
        "slots_per_replica": slots_per_replica,
        "backlog_per_slot": round(backlog / slots_per_replica, 3),
        "replicas_for_backlog": math.ceil(backlog / slots_per_replica),
    }
