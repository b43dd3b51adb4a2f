"""Task bodies too large for an SQS message: the body goes to S3, the message carries a pointer.

Written in the AWS SQS Extended Client's format, so its consumers (Java, Python) can read our
tasks and its producers can send us theirs: attribute ``ExtendedPayloadSize`` (the body's size in
bytes) and the body ``["software.amazon.payloadoffloading.PayloadS3Pointer", {"s3BucketName": b,
"s3Key": k}]``. Also read: taskiq-aio-sqs's own format, attribute ``s3_extended_message`` and the
body ``{"s3_bucket": b, "s3_key": k}``.

A pointer is as hostile as any message: only objects in the configured bucket are ever read, and
only an object whose body is a valid task is deleted (after its message is), so a pointer cannot
make a worker read or delete anything else. Keys are random, so a pointer to another task's
object must first have read that task's message.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from botocore.config import Config as BotoConfig

from dagster_taskiq_cancel.messages import MalformedMessage
from dagster_taskiq_cancel.settings import TaskiqCancelSettings

POINTER_CLASS = "software.amazon.payloadoffloading.PayloadS3Pointer"
SIZE_ATTRIBUTE = "ExtendedPayloadSize"
LEGACY_SIZE_ATTRIBUTE = "SQSLargePayloadSize"  # older Extended Client versions
TASKIQ_SQS_ATTRIBUTE = "s3_extended_message"
# What a receive asks SQS for on the main queue (every other attribute is left behind).
POINTER_ATTRIBUTES = (SIZE_ATTRIBUTE, LEGACY_SIZE_ATTRIBUTE, TASKIQ_SQS_ATTRIBUTE)
# Our tasks carry ids only: a payload this large is not one of them, and is not read.
MAX_PAYLOAD_BYTES = 4 * 1024 * 1024
MISSING_CODES = frozenset({"NoSuchKey", "404"})
_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]\Z")
# Path-style addressing: local servers (moto on 127.0.0.1) have no bucket sub-domains.
S3_CONFIG = BotoConfig(
    s3={"addressing_style": "path"},
    retries={"max_attempts": 2},
    connect_timeout=3,
    read_timeout=30,
)


class PayloadError(RuntimeError):
    """A task body cannot be sent as configured; the message says what to change."""


@dataclass(frozen=True)
class PayloadPointer:
    """Where one task body lives in S3, and its size when the message states it."""

    bucket: str
    key: str
    size: int | None = None

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


@dataclass(frozen=True)
class Offload:
    """A body to put in S3 before its pointer message is sent."""

    pointer: PayloadPointer
    payload: bytes
    body: str
    attributes: dict[str, dict[str, str]]


def plan_offload(settings: TaskiqCancelSettings, queue: str, body: str) -> Offload | None:
    """The S3 upload for ``body``, or None when it fits under the threshold and goes as it is.

    Raises ``PayloadError`` for an oversize body with no bucket configured: the sender fails
    with the fix, instead of SQS rejecting (or silently dropping) the task later.
    """
    payload = body.encode()
    threshold = settings.large_payload_threshold_bytes
    if len(payload) <= threshold:
        return None
    bucket = settings.large_payload_bucket
    if not bucket:
        raise PayloadError(
            f"task body of {len(payload)} bytes exceeds large_payload_threshold_bytes="
            f"{threshold} and no large_payload_bucket is set: set "
            f"{TaskiqCancelSettings.env_var('large_payload_bucket')} to an S3 bucket"
        )
    pointer = PayloadPointer(bucket, f"{queue}/{uuid.uuid4()}", len(payload))
    pointer_body = json.dumps(
        [POINTER_CLASS, {"s3BucketName": pointer.bucket, "s3Key": pointer.key}]
    )
    attributes = {SIZE_ATTRIBUTE: {"DataType": "Number", "StringValue": str(len(payload))}}
    return Offload(pointer, payload, pointer_body, attributes)


def read_pointer(
    body: str, attributes: Mapping[str, Any], bucket: str | None
) -> PayloadPointer | None:
    """The pointer in a received message, or None when the body is the task itself.

    Raises ``MalformedMessage`` for a pointer that is malformed or names another bucket (or any
    bucket, when none is configured): such an object is never fetched.
    """
    if TASKIQ_SQS_ATTRIBUTE in attributes:
        data = _json(body)
        if not isinstance(data, dict):
            raise MalformedMessage("taskiq-aio-sqs S3 pointer is not a JSON object")
        pointer = _pointer(data.get("s3_bucket"), data.get("s3_key"), None)
    else:
        names = [n for n in (SIZE_ATTRIBUTE, LEGACY_SIZE_ATTRIBUTE) if n in attributes]
        if not names:
            return None
        data = _json(body)
        if not (isinstance(data, list) and len(data) == 2 and data[0] == POINTER_CLASS):
            raise MalformedMessage(f"not a {POINTER_CLASS} body")
        if not isinstance(data[1], dict):
            raise MalformedMessage("S3 pointer is not a JSON object")
        size = _size(attributes[names[0]])
        pointer = _pointer(data[1].get("s3BucketName"), data[1].get("s3Key"), size)
    if bucket is None:
        raise MalformedMessage(
            f"points to {pointer.url}, but no large_payload_bucket is configured"
        )
    if pointer.bucket != bucket:
        raise MalformedMessage(f"points to {pointer.url}, not the configured bucket {bucket}")
    return pointer


def check_payload(pointer: PayloadPointer, payload: bytes) -> str:
    """The fetched body as text, if it is what the pointer announced."""
    if pointer.size is not None and pointer.size != len(payload):
        raise MalformedMessage(
            f"{pointer.url} holds {len(payload)} bytes, the message announced {pointer.size}"
        )
    try:
        return payload.decode()
    except UnicodeDecodeError:
        raise MalformedMessage(f"{pointer.url} is not UTF-8 text") from None


def too_large(pointer: PayloadPointer, length: int) -> MalformedMessage | None:
    """The rejection of an object too large to be one of our tasks (read before fetching it)."""
    if length <= MAX_PAYLOAD_BYTES:
        return None
    return MalformedMessage(f"{pointer.url} holds {length} bytes, over {MAX_PAYLOAD_BYTES}")


def _json(body: str) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise MalformedMessage("S3 pointer body is not JSON") from None


def _pointer(bucket: Any, key: Any, size: int | None) -> PayloadPointer:
    if not isinstance(bucket, str) or not _BUCKET_NAME.match(bucket):
        raise MalformedMessage("S3 pointer without a valid bucket name")
    if not isinstance(key, str) or not 1 <= len(key.encode(errors="surrogatepass")) <= 1024:
        raise MalformedMessage("S3 pointer without a valid key")
    try:
        key.encode()
    except UnicodeEncodeError:  # a lone surrogate from a JSON escape: no S3 key has one
        raise MalformedMessage("S3 pointer without a valid key") from None
    return PayloadPointer(bucket, key, size)


def _size(attribute: Any) -> int:
    value = attribute.get("StringValue") if isinstance(attribute, Mapping) else None
    if not (isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 12):
        raise MalformedMessage(f"{SIZE_ATTRIBUTE} is not a byte count")
    return int(value)
