"""Per-worker hint queues: a cancel hint goes where the work's holder listens.

On the shared ``{queue}-cancels`` queue a hint reaches whichever worker receives it, usually
not the holder, which then acts only at its next run-storage poll. So each worker also listens,
while it holds work, on a queue of its own, ``{queue}-w-{digest}`` (created at start, deleted at
clean shutdown, tagged with the worker id), and ``terminate()`` sends the hint to the queue of
every worker that may hold the run's work (the claimer of its task, each step's claimer) as well
as to the shared queue. It stays a hint: the holder checks the run storage before stopping anything.

A worker that dies without a clean shutdown leaves its queue behind, with its heartbeat row
(written before the queue is created): live workers sweep both, a few at a time
(``worker.sweep``), never by listing the queues, so a worker's start costs the same whatever
the size of the fleet.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Mapping, Sequence

from dagster import DagsterRun

from dagster_taskiq_cancel.queues import FIFO_SUFFIX, QueueNames, SqsError, SyncQueues
from dagster_taskiq_cancel.tasks import CLAIM_TAG

logger = logging.getLogger(__name__)

MAX_NAME = 80  # SQS: up to 80 characters, letters, digits, hyphens and underscores (+ ".fifo")
WORKER_ID_QUEUE_TAG = "dagster-taskiq-worker-id"
_MARK = "-w-"
_DIGEST = 12
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def _base(names: QueueNames) -> tuple[str, str]:
    """The main queue's name without ``.fifo``, shortened so a hint queue name always fits."""
    suffix = FIFO_SUFFIX if names.fifo else ""
    base = names.main[: -len(suffix)] if suffix else names.main
    return base[: MAX_NAME - len(FIFO_SUFFIX) - len(_MARK) - _DIGEST], suffix


def hint_prefix(names: QueueNames) -> str:
    """What every hint queue of this deployment's name starts with (for ListQueues)."""
    return _base(names)[0] + _MARK


def hint_queue_name(names: QueueNames, worker_id: str) -> str:
    """``{queue}-w-{digest}-{readable worker id}``, cut to SQS's 80 characters.

    The digest of the whole id keeps names unique when the readable part is cut; the readable
    part (host, pid) is for people looking at the queue list.
    """
    base, suffix = _base(names)
    digest = hashlib.sha256(worker_id.encode()).hexdigest()[:_DIGEST]
    name = f"{base}{_MARK}{digest}-{_UNSAFE.sub('-', worker_id)}"
    return name[: MAX_NAME - len(suffix)].rstrip("-") + suffix


def holders(run: DagsterRun, run_holder: str | None) -> set[str]:
    """Worker ids that may hold the run's work: ``run_holder`` (the claimer of its task, from
    ``claims``) and each step claimer its tags name. The step tags are shown for people and may
    miss a claim (a hint then waits for the poll); a tag inherited from a parent run names the
    parent's steps, and is ignored."""
    found = {run_holder} if run_holder else set()
    own = f"{CLAIM_TAG}/{run.run_id}:"
    for tag, token in run.tags.items():
        if tag.startswith(own) and "/" in token:
            found.add(token.rsplit("/", 1)[0])  # a claim token is "{worker id}/{nonce}"
    return found


def hint_url(queues: SyncQueues, name: str) -> str:
    """A hint queue's URL from the main queue's (same endpoint and account): no GetQueueUrl
    on the terminate path."""
    return queues.url(queues.names.main).rsplit("/", 1)[0] + "/" + name


def send_to_holders(
    queues: SyncQueues,
    entries: Sequence[tuple[DagsterRun, str, str]],
    run_holders: Mapping[str, str],
) -> int:
    """Send each (run, body, dedup id) to the hint queue of each of its run's holders
    (``run_holders``: run id → the worker that claimed its task).

    One SendMessageBatch per holder; a holder whose queue is gone (it died) or any other SQS
    error is logged and skipped: the shared queue and the poll still deliver. Returns how many
    holders were sent to.
    """
    by_queue: dict[str, list[tuple[str, str, str]]] = {}
    for run, body, dedup_id in entries:
        for worker_id in holders(run, run_holders.get(run.run_id)):
            name = hint_queue_name(queues.names, worker_id)
            by_queue.setdefault(name, []).append((body, run.run_id, dedup_id))
    sent = 0
    for name, batch in by_queue.items():
        try:
            queues.remember_url(name, hint_url(queues, name))
            failures = queues.send_batch(name, batch)
        except SqsError as exc:
            failures = [str(exc)]
        if failures:
            logger.info("Cancel hint to holder queue %s not sent: %s", name, failures[0])
        else:
            sent += 1
    return sent


def create(queues: SyncQueues, worker_id: str) -> str:
    """Create this worker's hint queue, tagged with its id; returns its URL."""
    name = hint_queue_name(queues.names, worker_id)
    attributes = {"FifoQueue": "true"} if queues.names.fifo else {}
    url = queues.call(
        "create_queue",
        QueueName=name,
        Attributes=attributes,
        tags={WORKER_ID_QUEUE_TAG: worker_id},
    )["QueueUrl"]
    queues.remember_url(name, url)
    return url


def listed(queues: SyncQueues) -> list[str]:
    """URLs of every hint queue of this deployment."""
    urls: list[str] = []
    kwargs = {"QueueNamePrefix": hint_prefix(queues.names), "MaxResults": 1000}
    while True:
        page = queues.call("list_queues", **kwargs)
        urls += page.get("QueueUrls", [])
        if not page.get("NextToken"):
            return urls
        kwargs["NextToken"] = page["NextToken"]


def delete(queues: SyncQueues, name: str) -> bool:
    """Delete the hint queue ``name`` (its URL derived: one call); True once it is gone, also
    when it was gone already."""
    try:
        queues.call("delete_queue", QueueUrl=hint_url(queues, name))
    except SqsError as exc:
        code = getattr(exc.__cause__, "response", {}).get("Error", {}).get("Code", "")
        if "NonExistentQueue" not in code and "QueueDoesNotExist" not in code:
            logger.warning("Could not delete hint queue %s: %s", name, exc)
            return False
    return True
