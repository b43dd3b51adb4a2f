"""Pooled Postgres connections for a long-lived instance: the worker's, a bulk cancel's.

dagster-postgres gives every storage a ``NullPool`` engine, so each call opens a connection (a
forked backend, ~20 ms): a busy worker polling every second opened about 66 a minute, a fleet of
them thousands a second. A worker is one long-lived process with one storage thread (and one
heartbeat thread, with its own instance): each of its instances needs one connection, kept. A
bulk cancel writes from ``WRITERS`` threads: one kept connection each.

The pool survives what a kept connection meets: ``pool_pre_ping`` replaces a connection that a
server restart, ``pg_terminate_backend`` or an idle timeout ended, before the call uses it; and
``pool_recycle`` replaces one older than ``RECYCLE_SECONDS`` (so never one idle longer) before a
NAT or load balancer (AWS: 350 s idle) drops it silently, where a ping could hang. While the
server is down a call fails as before (Dagster retries the connect for a few seconds), and the
next call once it is up works: the poll and the heartbeat already try again at their next
interval.

sqlite (a file, no server) and MySQL storages are left as Dagster makes them.
"""

from __future__ import annotations

import importlib
from typing import Any

from dagster import DagsterInstance
from sqlalchemy.engine import Engine
from sqlalchemy.pool import NullPool

# The overflow covers a nested or concurrent call (start-up, a metrics read): opened for it,
# closed when it is returned.
MAX_OVERFLOW = 2
RECYCLE_SECONDS = 300


def pool_connections(instance: DagsterInstance, threads: int = 1) -> DagsterInstance:
    """``instance``, its Postgres storages now sharing one pool per database that keeps a
    connection for each of the ``threads`` that call it; returned for chaining. A no-op for
    other storages and for an instance already pooled."""
    engines: dict[str, Engine] = {}
    for storage in _postgres_storages(instance):
        if not isinstance(storage._engine.pool, NullPool):
            continue
        url = storage.postgres_url
        if url not in engines:
            token_provider = getattr(storage, "_token_provider", None)
            engines[url] = _pooled_engine(url, token_provider, threads)
        storage._engine.dispose()  # NullPool: holds nothing, but say it is done with
        storage._engine = engines[url]
    return instance


def close_connections(instance: DagsterInstance) -> None:
    """Close the connections the instance's pools keep: Dagster's ``dispose`` leaves engines
    alone (a NullPool keeps nothing), and a dropped instance would hold them until collected."""
    for storage in _postgres_storages(instance):
        storage._engine.dispose()


def _postgres_storages(instance: DagsterInstance) -> list[Any]:
    """The instance's storages that dagster-postgres made (an engine and its URL)."""
    storages = (instance.run_storage, instance.event_log_storage, instance.schedule_storage)
    return [
        storage
        for storage in storages
        if isinstance(engine := getattr(storage, "_engine", None), Engine)
        and engine.dialect.name == "postgresql"
        and isinstance(getattr(storage, "postgres_url", None), str)
    ]


def _pooled_engine(url: str, token_provider: Any, size: int) -> Engine:
    """The engine dagster-postgres makes (its token hook, AUTOCOMMIT), with kept connections.

    dagster-postgres made the storage, so it is installed; it is not a dependency of this
    package (an instance on sqlite needs none), hence the import by name, here only.
    """
    create_pg_engine = importlib.import_module("dagster_postgres.utils").create_pg_engine
    return create_pg_engine(
        url,
        token_provider,
        isolation_level="AUTOCOMMIT",
        pool_size=size,
        max_overflow=MAX_OVERFLOW,
        pool_recycle=RECYCLE_SECONDS,
        pool_pre_ping=True,
    )
