"""The worker's pooled Postgres connections: how many it opens, and what a pool survives.

In-process, with the worker's own storage calls (poll, claims, event reads, heartbeat), against
a private cluster that logs every connection it accepts: the count is the server's, not ours.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml
from dagster import DagsterInstance
from dagster_postgres.utils import DagsterPostgresException

from dagster_taskiq_cancel import claims, heartbeats
from dagster_taskiq_cancel.cancel import WRITERS, pooled_instance
from dagster_taskiq_cancel.storage_pool import close_connections, pool_connections
from dagster_taskiq_cancel.worker.authority import held_runs, run_started
from dagster_taskiq_cancel.worker.worker import own_instance
from dagster_taskiq_cancel_tests.postgres import PostgresCluster, storage_config
from dagster_taskiq_cancel_tests.stack import wait_for
from dagster_taskiq_cancel_tests.test_claims import make_run

ROUNDS = 30  # poll intervals of a busy worker


@pytest.fixture(scope="module")
def cluster() -> Iterator[PostgresCluster]:
    """A cluster of this module's own: it is restarted, and it logs every connection."""
    server = PostgresCluster(settings={"log_connections": "on"}).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def database(cluster: PostgresCluster) -> Mapping[str, Any]:
    """One database for the module: Dagster's schema takes seconds to make."""
    return cluster.database()


@pytest.fixture
def instance(
    tmp_path: Path, cluster: PostgresCluster, database: Mapping[str, Any]
) -> Iterator[DagsterInstance]:
    """An instance of this test's own; its kept connections closed (and gone) afterwards."""
    config = {"telemetry": {"enabled": False}, **storage_config(database)}
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(config))
    with DagsterInstance.from_config(str(tmp_path)) as dagster_instance:
        yield dagster_instance
        close_connections(dagster_instance)
    db_name = database["db_name"]
    wait_for(lambda: not cluster.backends(db_name), 10, "the test's connections closed")


def poll_round(instance: DagsterInstance, run_id: str) -> None:
    """What a busy worker asks each poll interval, on run storage, kv table and event log."""
    held_runs(instance, {run_id})
    claims.sent(instance, {run_id})
    run_started(instance, run_id)


def test_a_busy_worker_opens_one_connection_per_instance(
    cluster: PostgresCluster, database: Mapping[str, Any], instance: DagsterInstance
) -> None:
    """Unpooled, every call opens a connection; pooled, the storage thread's instance keeps one
    for run storage and event log together, and the heartbeat's instance one of its own."""
    db_name = database["db_name"]
    run_id = make_run(instance).run_id
    before = cluster.connections_opened(db_name)
    poll_round(instance, run_id)
    unpooled = cluster.connections_opened(db_name) - before
    assert unpooled >= 3, unpooled  # one per call: NullPool, Dagster's default
    print(f"unpooled: {unpooled} connections for one poll round")

    pool_connections(instance)
    beats = own_instance(instance)
    try:
        before = cluster.connections_opened(db_name)
        for index in range(ROUNDS):
            poll_round(instance, run_id)
            heartbeats.beat(beats, "w1", heartbeats.Beat(float(index), frozenset({run_id})))
        assert cluster.connections_opened(db_name) - before == 2
        assert len(cluster.backends(db_name)) == 2  # kept: one per instance
        assert heartbeats.last_beat(instance, "w1") is not None
    finally:
        close_connections(beats)
        beats.dispose()
    wait_for(lambda: len(cluster.backends(db_name)) == 1, 10, "the heartbeat's connection closed")


@pytest.mark.parametrize("ending", ["terminated", "idle timeout"])
def test_a_stale_connection_is_replaced_before_the_next_call(
    cluster: PostgresCluster, database: Mapping[str, Any], instance: DagsterInstance, ending: str
) -> None:
    """A kept connection whose backend ended (an admin's ``pg_terminate_backend``, the server's
    ``idle_session_timeout``) is pinged at checkout and replaced: the call itself works."""
    db_name = database["db_name"]
    if ending == "idle timeout":  # for the sessions that start from now on: the kept one
        cluster.execute(f'ALTER DATABASE "{db_name}" SET idle_session_timeout = 1000')
    try:
        run_id = make_run(pool_connections(instance)).run_id
        poll_round(instance, run_id)
    finally:
        cluster.execute(f'ALTER DATABASE "{db_name}" RESET idle_session_timeout')
    (kept,) = cluster.backends(db_name)
    if ending == "terminated":
        cluster.execute("SELECT pg_terminate_backend(%s)", (kept,))
    wait_for(lambda: kept not in cluster.backends(db_name), 10, f"backend {kept} gone")
    before = cluster.connections_opened(db_name)
    poll_round(instance, run_id)
    assert cluster.connections_opened(db_name) - before == 1


def test_the_pool_survives_a_server_restart(
    cluster: PostgresCluster, database: Mapping[str, Any], instance: DagsterInstance
) -> None:
    """Restarted between two calls (every backend ended by a fast shutdown), the next call
    works: no failed poll or beat, one new connection."""
    db_name = database["db_name"]
    run_id = make_run(pool_connections(instance)).run_id
    poll_round(instance, run_id)
    with cluster.down():
        pass
    before = cluster.connections_opened(db_name)
    poll_round(instance, run_id)
    assert cluster.connections_opened(db_name) - before == 1


def test_a_call_while_the_server_is_down_fails_and_the_next_one_works(
    cluster: PostgresCluster, instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call made while the server is down fails (after Dagster's own few seconds of connect
    retries), as unpooled: the worker's poll and beat try again at their next interval, and the
    first try once the server is up works."""
    # Dagster's five connect retries, without their ~10 s of backoff: same path, faster test.
    monkeypatch.setattr("dagster_postgres.utils.calculate_delay", lambda **_: 0.01)
    run_id = make_run(pool_connections(instance)).run_id
    poll_round(instance, run_id)
    with cluster.down(), pytest.raises(DagsterPostgresException):
        held_runs(instance, {run_id})
    assert held_runs(instance, {run_id})[run_id] is not None


def test_a_bulk_cancel_keeps_a_connection_per_writer_and_closes_them(
    cluster: PostgresCluster, database: Mapping[str, Any], instance: DagsterInstance
) -> None:
    """Each of its writer threads keeps one connection; all closed when the cancel is done."""
    db_name = database["db_name"]
    run_id = make_run(instance).run_id
    with pooled_instance(instance) as pooled, ThreadPoolExecutor(WRITERS) as writers:
        before = cluster.connections_opened(db_name)  # after the instance's own start-up
        list(writers.map(lambda _: poll_round(pooled, run_id), range(WRITERS * ROUNDS)))
        assert cluster.connections_opened(db_name) - before <= WRITERS
    wait_for(lambda: not cluster.backends(db_name), 10, "the bulk cancel's connections closed")


def test_sqlite_is_left_as_dagster_makes_it(tmp_path: Path) -> None:
    """A file, no server: nothing to keep open (and one writer at a time)."""
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump({"telemetry": {"enabled": False}}))
    with DagsterInstance.from_config(str(tmp_path)) as sqlite:
        before = [vars(s).get("_engine") for s in (sqlite.run_storage, sqlite.event_log_storage)]
        run_id = make_run(pool_connections(sqlite)).run_id
        after = [vars(s).get("_engine") for s in (sqlite.run_storage, sqlite.event_log_storage)]
        assert after == before
        assert held_runs(sqlite, {run_id})[run_id] is not None
