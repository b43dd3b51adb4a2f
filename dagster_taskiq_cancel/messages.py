"""CancelRequest and CancelAck: the JSON bodies on the ``-cancels`` and ``-cancel-acks`` queues.

Both carry ``"v": 1`` and are validated on receipt. A body that fails validation raises
``MalformedMessage``; callers log it with its SQS message id and set it aside.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_BODY_BYTES = 64 * 1024

Outcome = Literal["cancelled", "killed", "skipped", "not_running", "cleanup_failed"]
STOPPED_OUTCOMES: frozenset[str] = frozenset({"cancelled", "killed", "skipped", "cleanup_failed"})


class MalformedMessage(ValueError):
    """A queue message body that is not a valid message of the expected kind."""


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)

    v: Literal[1] = 1

    def to_json(self) -> str:
        return self.model_dump_json()


class CancelRequest(_Message):
    """Asks the worker that holds ``run_id`` (or one of its steps) to check the run storage now."""

    request_id: str = Field(default_factory=lambda: uuid.uuid4().hex, min_length=1, max_length=128)
    run_id: str = Field(min_length=1, max_length=128)
    step_key: str | None = Field(default=None, max_length=1024)
    reason: str = Field(default="", max_length=4096)
    requested_by: str = Field(default="", max_length=256)
    requested_at: float = Field(default_factory=time.time)
    notice_seconds: float | None = Field(default=None, ge=0)
    grace_seconds: float | None = Field(default=None, ge=0)


class CancelAck(_Message):
    """What a worker did about a run or step that is no longer live."""

    request_id: str | None = Field(default=None, max_length=128)
    run_id: str = Field(min_length=1, max_length=128)
    step_key: str | None = Field(default=None, max_length=1024)
    task_id: str = Field(default="", max_length=2048)
    worker_id: str = Field(max_length=256)
    outcome: Outcome
    requested_at: float | None = None
    stopped_at: float = Field(default_factory=time.time)
    detail: str = Field(default="", max_length=8192)


M = TypeVar("M", bound=_Message)


def parse_message(kind: type[M], body: str | bytes) -> M:
    """Validate ``body`` as ``kind`` or raise ``MalformedMessage`` with a short reason."""
    raw = body.encode() if isinstance(body, str) else body
    if len(raw) > MAX_BODY_BYTES:
        raise MalformedMessage(f"body of {len(raw)} bytes exceeds {MAX_BODY_BYTES}")
    try:
        return kind.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise MalformedMessage(f"not a {kind.__name__} v1: {where}: {first['msg']}") from None
