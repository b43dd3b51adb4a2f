"""Who runs which task: claims decided by one INSERT into the run storage's key-value table.

Run tags cannot hold a claim: Dagster copies a run's tags to its re-executions and retries, and
``add_run_tags`` rewrites the whole run, so concurrent writers lose each other's tags. Dagster's
run storage has a key-value table (``kvs``) with a UNIQUE index on its key; a plain INSERT of a
key that exists fails with an IntegrityError on sqlite, Postgres and MySQL alike, so of any
number of concurrent claims of one task exactly one inserts its row: a true compare-and-set.

Every key is specific to one launch: task ids already are (run id, ``{run_id}-resume-N``,
``run:step:attempt``; a re-execution or a retry is a new run with a new id). Keys, each under
``dagster-taskiq/``:

- ``claim/{digest}``: the task's claim, ``{"task_id", "worker_id", "at"}`` (written once);
- ``released/{digest}``: the worker that stopped the task's process for another worker to
  resume its run (fencing, scale-in);
- ``sent/{run_id}``: the task the launcher last sent for the run, ``{"task_id", "at", "queue"}``;
- ``launched/{digest}``: a step task its run's executor sent, ``{"task_id", "known_state",
  "queue"}`` (Dagster's serialized ``KnownExecutionState`` for that step): one row read admits a
  step, however many steps its run has.

``{digest}`` is a hash of the task id, so that keys stay short and distinct within the first 64
characters (MySQL's unique index covers no more).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Collection
from dataclasses import dataclass

import sqlalchemy as db
from dagster import DagsterInstance
from dagster._core.storage.runs.schema import KeyValueStoreTable
from dagster._core.storage.runs.sql_run_storage import SqlRunStorage

from dagster_taskiq_cancel.tasks import TAG_PREFIX

_CLAIM = f"{TAG_PREFIX}claim/"
_RELEASED = f"{TAG_PREFIX}released/"
_SENT = f"{TAG_PREFIX}sent/"
_LAUNCHED = f"{TAG_PREFIX}launched/"


class UnsupportedRunStorage(ValueError):
    """The instance's run storage has no key-value table to hold claims in."""


@dataclass(frozen=True)
class Claim:
    """A task's one claim: which worker, and when (that worker's clock, seconds since epoch)."""

    task_id: str
    worker_id: str
    at: float


@dataclass(frozen=True)
class Launch:
    """A step task as its run's executor sent it: the state the step starts from, serialized."""

    task_id: str
    known_state: str
    queue: str | None  # None: recorded without one (sent to the main queue)


@dataclass(frozen=True)
class Sent:
    """The task the launcher last sent for a run, when, and to which queue (None: recorded by
    an earlier version, which sent every run to the main queue)."""

    task_id: str
    at: float
    queue: str | None = None


def _digest(task_id: str) -> str:
    return hashlib.sha256(task_id.encode("utf-8", "surrogatepass")).hexdigest()[:40]


def claim_key(task_id: str) -> str:
    return _CLAIM + _digest(task_id)


def released_key(task_id: str) -> str:
    return _RELEASED + _digest(task_id)


def sent_key(run_id: str) -> str:
    return _SENT + run_id


def launched_key(task_id: str) -> str:
    return _LAUNCHED + _digest(task_id)


def sql_storage(instance: DagsterInstance) -> SqlRunStorage:
    """The instance's run storage, or a clear error naming what to change."""
    storage = instance.run_storage
    if not isinstance(storage, SqlRunStorage):
        raise UnsupportedRunStorage(
            f"dagster-taskiq-cancel keeps task claims in the run storage's key-value table, "
            f"which {type(storage).__name__} does not have: configure a SQL run storage "
            "(sqlite, postgres or mysql) in dagster.yaml"
        )
    return storage


def claim(instance: DagsterInstance, task_id: str, worker_id: str) -> bool:
    """Claim ``task_id`` for ``worker_id``: True for exactly one of any concurrent claimers."""
    value = json.dumps({"task_id": task_id, "worker_id": worker_id, "at": time.time()})
    storage = sql_storage(instance)
    try:
        with storage.connect() as conn:
            conn.execute(KeyValueStoreTable.insert().values(key=claim_key(task_id), value=value))
    except db.exc.IntegrityError:
        return False
    return True


def claims(instance: DagsterInstance, task_ids: Collection[str]) -> dict[str, Claim]:
    """The claims of ``task_ids`` that exist, by task id (one query)."""
    values = _read(instance, {claim_key(t): t for t in task_ids})
    return {
        task_id: Claim(task_id, str(value["worker_id"]), float(value["at"]))
        for task_id, value in values.items()
    }


def claim_of(instance: DagsterInstance, task_id: str) -> Claim | None:
    return claims(instance, [task_id]).get(task_id)


def record_sent(
    instance: DagsterInstance, run_id: str, task_id: str, queue: str | None = None
) -> None:
    """The launcher's record that ``task_id`` is now the run's task (launch or resume), sent to
    ``queue``."""
    value = json.dumps({"task_id": task_id, "at": time.time(), "queue": queue})
    sql_storage(instance).set_cursor_values({sent_key(run_id): value})


def sent_key_sql(run_id: db.ColumnElement[str]) -> db.ColumnElement[str]:
    """``sent_key`` of a SQL column: to join each run to its sent row in one query."""
    return db.literal(_SENT, db.Text) + run_id


def parse_sent(value: str) -> Sent:
    """A ``sent/`` row's value as read by SQL (the poll's join)."""
    return _sent(json.loads(value))


def _sent(found: dict[str, object]) -> Sent:
    return Sent(str(found["task_id"]), float(found["at"]), _text(found.get("queue")))


def sent(instance: DagsterInstance, run_ids: Collection[str]) -> dict[str, Sent]:
    """The task last sent for each of ``run_ids`` that has one (one query)."""
    values = _read(instance, {sent_key(r): r for r in run_ids})
    return {run_id: _sent(value) for run_id, value in values.items()}


def sent_of(instance: DagsterInstance, run_id: str) -> Sent | None:
    return sent(instance, [run_id]).get(run_id)


def record_launch(
    instance: DagsterInstance, task_id: str, known_state: str, queue: str | None = None
) -> None:
    """The executor's record that it sends step task ``task_id``, written before the send.

    Written again when a resumed run process sends the same attempt anew: the latest state
    is the one to start from.
    """
    value = json.dumps({"task_id": task_id, "known_state": known_state, "queue": queue})
    sql_storage(instance).set_cursor_values({launched_key(task_id): value})


def launch_of(instance: DagsterInstance, task_id: str) -> Launch | None:
    """The launch record of step task ``task_id``, if its executor sent it (one row)."""
    value = _read(instance, {launched_key(task_id): task_id}).get(task_id)
    if value is None or value.get("task_id") != task_id:
        return None
    return Launch(task_id, str(value["known_state"]), _text(value.get("queue")))


def release(instance: DagsterInstance, task_id: str, worker_id: str) -> None:
    """Mark ``task_id`` released: its worker stopped it for the run to be resumed elsewhere."""
    instance.run_storage.set_cursor_values({released_key(task_id): worker_id})


def released_by(instance: DagsterInstance, task_id: str) -> str | None:
    key = released_key(task_id)
    return instance.run_storage.get_cursor_values({key}).get(key)


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _read(instance: DagsterInstance, keys: dict[str, str]) -> dict[str, dict[str, object]]:
    """JSON values of the kvs ``keys`` that exist, by what each key stands for."""
    if not keys:
        return {}
    found = instance.run_storage.get_cursor_values(set(keys))
    return {keys[key]: json.loads(value) for key, value in found.items()}


def run_claims(instance: DagsterInstance, run_ids: Collection[str]) -> dict[str, Claim]:
    """For each run whose task last sent is claimed, that claim: who holds the run (two
    queries)."""
    latest = sent(instance, run_ids)
    found = claims(instance, {s.task_id for s in latest.values()})
    return {run_id: found[s.task_id] for run_id, s in latest.items() if s.task_id in found}


def run_claim(instance: DagsterInstance, run_id: str) -> Claim | None:
    return run_claims(instance, [run_id]).get(run_id)
