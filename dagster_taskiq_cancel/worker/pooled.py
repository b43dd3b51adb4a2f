"""Pooled Postgres connections for the worker's instances.

dagster-postgres gives every storage a ``NullPool`` engine, so each call opens a connection (a
forked backend, ~20 ms): a busy worker polling every second opened about 66 a minute, a fleet of
them thousands a second. A worker is one long-lived process with one storage thread (and one
heartbeat thread, with its own instance): each of its instances needs one connection, kept.

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

from typing import Any

from dagster import DagsterInstance
from sqlalchemy.engine import Engine
from sqlalchemy.pool import NullPool

# One thread calls each instance's storages; the overflow covers a nested or concurrent call
# (start-up, a metrics read) and is closed when it is returned.
POOL_SIZE = 1
MAX_OVERFLOW = 2
RECYCLE_SECONDS = 300


def pool_connections(instance: DagsterInstance) -> DagsterInstance:
    """``instance``, its Postgres storages now sharing one small pool per database; returned
    for chaining. A no-op for other storages and for an instance already pooled."""
    engines: dict[str, Engine] = {}
    for storage in _unpooled_postgres(instance):
        url = storage.postgres_url
        if url not in engines:
            engines[url] = _pooled_engine(url, getattr(storage, "_token_provider", None))
        storage._engine.dispose()  # NullPool: holds nothing, but say it is done with
        storage._engine = engines[url]
    return instance


def close_connections(instance: DagsterInstance) -> None:
    """Close the connections the instance's pools keep: Dagster's ``dispose`` leaves engines
    alone (a NullPool keeps nothing), and a dropped instance would hold them until collected."""
    for storage in _storages(instance):
        engine = getattr(storage, "_engine", None)
        if isinstance(engine, Engine):
            engine.dispose()


def _unpooled_postgres(instance: DagsterInstance) -> list[Any]:
    return [
        storage
        for storage in _storages(instance)
        if isinstance(engine := getattr(storage, "_engine", None), Engine)
        and engine.dialect.name == "postgresql"
        and isinstance(engine.pool, NullPool)
        and isinstance(getattr(storage, "postgres_url", None), str)
    ]


def _storages(instance: DagsterInstance) -> list[Any]:
    return [
        storage
        for storage in (instance.run_storage, instance.event_log_storage, instance.schedule_storage)
        if storage is not None
    ]


def _pooled_engine(url: str, token_provider: Any) -> Engine:
    """The engine dagster-postgres makes (its token hook, AUTOCOMMIT), with a kept connection."""
    from dagster_postgres.utils import create_pg_engine

    return create_pg_engine(
        url,
        token_provider,
        isolation_level="AUTOCOMMIT",
        pool_size=POOL_SIZE,
        max_overflow=MAX_OVERFLOW,
        pool_recycle=RECYCLE_SECONDS,
        pool_pre_ping=True,
    )
