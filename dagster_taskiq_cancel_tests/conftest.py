from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dagster_taskiq_cancel.local_sqs import SERVERS, LocalSqsServer
from dagster_taskiq_cancel_tests.stack import Deployment


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--soak-runs",
        type=int,
        default=40,
        help="runs in the soak test (the short form fits `make test`; the long form is 200)",
    )


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
def deployment(tmp_path: Path, sqs_server: LocalSqsServer) -> Iterator[Deployment]:
    stack = Deployment(tmp_path, sqs_server.endpoint_url)
    try:
        yield stack
    finally:
        stack.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item) -> Iterator[None]:
    """Keep each phase's report on the item, so fixtures can screenshot on failure."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{report.when}", report)
