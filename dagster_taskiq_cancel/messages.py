"""CancelRequest and CancelAck: the JSON bodies on the ``-cancels`` and ``-cancel-acks`` queues.

Both carry ``"v": 1`` and are validated on receipt. A body that fails validation raises
``MalformedMessage``, whatever it holds (deep nesting, huge numbers, lone surrogates): callers
log it with its SQS message id and set it aside, so no body can end the loop that reads it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import time
import uuid
from typing import ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dagster_taskiq_cancel.settings import TaskiqCancelSettings

MAX_BODY_BYTES = 64 * 1024

# ``not_running`` is no longer sent (a non-holder stays silent); still read, from older workers
# in a rolling upgrade.
Outcome = Literal["cancelled", "killed", "skipped", "not_running", "cleanup_failed"]
STOPPED_OUTCOMES: frozenset[str] = frozenset({"cancelled", "killed", "skipped", "cleanup_failed"})
_HEX_MAC = re.compile(r"[0-9a-f]{64}\Z")


class MalformedMessage(ValueError):
    """A queue message body that is not a valid message of the expected kind."""


class _Message(BaseModel):
    # No NaN or Infinity: JSON cannot carry them back (they are sent on as null), and an
    # infinite grace_seconds would mean a stop that never reaches SIGKILL.
    model_config = ConfigDict(extra="ignore", frozen=True, strict=True, allow_inf_nan=False)

    v: Literal[1] = 1
    # Whether a signed copy expires after ``signature_max_age_seconds`` (replays of old ones).
    expires: ClassVar[bool] = True

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
    """What a worker did about a run or step that is no longer live.

    Never stale: it reports a fact, still true when the sensor reads it an hour late (the daemon
    was down), and a replayed copy can only repeat it.
    """

    expires: ClassVar[bool] = False

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


class Codec:
    """Message bodies on the wire: plain JSON, or signed when keys are configured.

    A signed body is ``{"signed": <message JSON>, "ts": <epoch>, "mac": <hex>}`` with the
    HMAC-SHA256 of ``"<ts>.<message JSON>"``. The first key signs; a body signed with any of
    them is accepted, so that a key can be rotated in without a moment where senders and
    receivers disagree. With keys, only well signed bodies are accepted (of the kinds that
    expire, only fresh ones); without, both forms are read as hints (the run storage decides).
    """

    def __init__(self, *keys: str, max_age_seconds: float = 300.0) -> None:
        self._keys = tuple(key.encode() for key in keys)
        self.max_age_seconds = max_age_seconds

    @property
    def signed(self) -> bool:
        """Whether every accepted message was verified against a key (else: hints only)."""
        return bool(self._keys)

    def _macs(self, data: bytes) -> list[str]:
        """``data``'s MAC under each key, the signing key's first."""
        return [hmac.new(key, data, hashlib.sha256).hexdigest() for key in self._keys]

    def _verifies(self, data: bytes, mac: str) -> bool:
        """Whether ``mac`` is the MAC of ``data`` under any key (each compared in constant time)."""
        given = _utf8(mac)
        return any([hmac.compare_digest(given, _utf8(m)) for m in self._macs(data)])

    def mac(self, payload: str) -> str | None:
        """HMAC-SHA256 of ``payload`` (a task's name, id and arguments); None without a key."""
        return self._macs(_utf8(payload))[0] if self._keys else None

    def mac_error(self, payload: str, mac: str | None) -> str | None:
        """Why ``mac`` does not sign ``payload`` under a key, or None when it does (or no key).

        Tasks are not checked for freshness: one may wait in a backlog for hours, and a replayed
        task is dropped as a duplicate by its claim in the run storage.
        """
        if not self._keys:
            return None
        if mac is None:
            return "unsigned task rejected: a signing key is configured"
        if not self._verifies(_utf8(payload), mac):
            return "bad task signature"
        return None

    def dumps(self, message: _Message) -> str:
        inner = message.to_json()
        return self.seal(inner) if self._keys else inner

    def seal(self, inner: str) -> str:
        """``inner`` in an envelope signed now with the first key."""
        ts = time.time()
        return json.dumps({"signed": inner, "ts": ts, "mac": self._macs(_stamped(ts, inner))[0]})

    def loads(self, kind: type[M], body: str | bytes) -> M:
        """Verify (when keyed) and validate ``body``; ``MalformedMessage`` says why not."""
        raw = _utf8(body)
        if len(raw) > MAX_BODY_BYTES:
            raise MalformedMessage(f"body of {len(raw)} bytes exceeds {MAX_BODY_BYTES}")
        envelope = _envelope(raw)
        if envelope is None:
            if self._keys:
                raise MalformedMessage("unsigned message rejected: a signing key is configured")
            return parse_message(kind, raw)
        inner, ts, mac = envelope
        if self._keys:
            if not self._verifies(_stamped(ts, inner), mac):
                raise MalformedMessage("bad signature")
            if kind.expires and abs(time.time() - ts) > self.max_age_seconds:
                raise MalformedMessage(f"stale signature ({time.time() - ts:.0f}s old)")
        return parse_message(kind, inner)


def _stamped(ts: float, inner: str) -> bytes:
    """What a message's MAC covers: its time stamp and its JSON."""
    return _utf8(f"{ts!r}.{inner}")


def _utf8(body: str | bytes) -> bytes:
    """``body`` as UTF-8; a str that JSON decoding left with lone surrogates is malformed."""
    if isinstance(body, bytes):
        return body
    try:
        return body.encode()
    except UnicodeEncodeError:
        raise MalformedMessage("not valid UTF-8 (lone surrogate)") from None


def _envelope(raw: bytes) -> tuple[str, float, str] | None:
    """The parts of a signed envelope, or None when ``raw`` is not one."""
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    except RecursionError:
        raise MalformedMessage("JSON nested too deeply") from None
    if not isinstance(data, dict) or "signed" not in data:
        return None
    inner, ts, mac = data.get("signed"), data.get("ts"), data.get("mac")
    if (
        not isinstance(inner, str)
        or isinstance(ts, bool)
        or not isinstance(ts, int | float)
        or not isinstance(mac, str)
        or not _HEX_MAC.match(mac)
    ):
        raise MalformedMessage("malformed signature envelope")
    try:
        stamp = float(ts)
    except OverflowError:
        stamp = math.inf
    if not math.isfinite(stamp):
        raise MalformedMessage("malformed signature envelope: ts out of range")
    return inner, stamp, mac


def parse_message(kind: type[M], body: str | bytes) -> M:
    """Validate ``body`` as ``kind`` or raise ``MalformedMessage`` with a short reason."""
    raw = _utf8(body)
    if len(raw) > MAX_BODY_BYTES:
        raise MalformedMessage(f"body of {len(raw)} bytes exceeds {MAX_BODY_BYTES}")
    try:
        return kind.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise MalformedMessage(f"not a {kind.__name__} v1: {where}: {first['msg']}") from None


def codec_for(settings: TaskiqCancelSettings) -> Codec:
    return Codec(*settings.keyring, max_age_seconds=settings.signature_max_age_seconds)
