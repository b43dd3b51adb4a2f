from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from dagster import DagsterInstance

from dagster_taskiq_cancel.local_sqs import SERVERS, LocalSqsServer
from dagster_taskiq_cancel_tests.postgres import PostgresCluster, storage_config
from dagster_taskiq_cancel_tests.stack import Deployment


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--soak-runs",
        type=int,
        default=40,
        help="runs in the soak test (the short form fits `make test`; the long form is 200)",
    )


# Tests marked ``postgres`` run on each SQS server once and each storage once: ministack with
# sqlite (the demo's storage), moto with Postgres (production's). Pinned to one SQS server,
# they run on Postgres alone: they are the load tests, and Postgres is the storage a fleet shares.
STORAGE_VARIANTS = [("ministack", "sqlite"), ("moto", "postgres")]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "postgres: run the test on a private PostgreSQL cluster too (see conftest)"
    )
    config.addinivalue_line(
        "markers", "moto_only: run the test on moto alone (see stack.MOTO_ONLY)"
    )


@pytest.hookimpl(tryfirst=True)
def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Give ``moto_only`` and ``postgres`` tests their variants as parametrize marks, before
    pytest reads the marks and the fixtures' own params (a mark takes precedence over
    ``sqs_server``'s)."""
    definition = metafunc.definition
    if definition.get_closest_marker("moto_only") and "sqs_server" in metafunc.fixturenames:
        definition.add_marker(pytest.mark.parametrize("sqs_server", ["moto"], indirect=True))
    if definition.get_closest_marker("postgres") is None:
        return
    pinned = any("sqs_server" in str(m.args[0]) for m in definition.iter_markers("parametrize"))
    if pinned:  # a load test: the fleet's storage only
        mark = pytest.mark.parametrize("storage_kind", ["postgres"], indirect=True, scope="session")
    else:
        mark = pytest.mark.parametrize(
            ("sqs_server", "storage_kind"),
            STORAGE_VARIANTS,
            indirect=True,
            ids=[f"{sqs}-{storage}" for sqs, storage in STORAGE_VARIANTS],
            scope="session",  # group the tests by server and storage: each starts once
        )
    definition.add_marker(mark)


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """One private cluster for the whole run, started only if a Postgres variant runs."""
    cluster = PostgresCluster().start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def storage_kind(request: pytest.FixtureRequest) -> str:
    """``sqlite`` unless a ``postgres`` variant asks for ``postgres``."""
    return str(getattr(request, "param", "sqlite"))


@pytest.fixture
def storage(request: pytest.FixtureRequest, storage_kind: str) -> dict[str, Any]:
    """The dagster.yaml storage keys of this test: none (sqlite in the Dagster home), or a
    database of its own on the private cluster."""
    if storage_kind == "sqlite":
        return {}
    cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
    return storage_config(cluster.database())


@pytest.fixture(scope="session", params=list(SERVERS), ids=list(SERVERS))
def sqs_server(request: pytest.FixtureRequest) -> Iterator[LocalSqsServer]:
    """Each integration test runs against two independent SQS implementations, so that none
    passes only because one emulator forgives what AWS does not."""
    server = SERVERS[request.param]().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def deployment(
    tmp_path: Path, sqs_server: LocalSqsServer, storage: dict[str, Any]
) -> Iterator[Deployment]:
    with Deployment(tmp_path, sqs_server.endpoint_url, instance_config=storage) as stack:
        yield stack


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item) -> Iterator[None]:
    """Keep each phase's report on the item, so fixtures can screenshot on failure."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture(params=["sqlite", "postgres"])
def any_storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[DagsterInstance]:
    """An instance on sqlite, then on the private Postgres cluster: where storage semantics
    (unique keys, deletes, key order) matter."""
    config: dict[str, Any] = {"telemetry": {"enabled": False}}
    if request.param == "postgres":
        cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
        config.update(storage_config(cluster.database()))
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(config))
    with DagsterInstance.from_config(str(tmp_path)) as dagster_instance:
        yield dagster_instance
