from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from dagster_taskiq_cancel.local_sqs import LOCAL_CREDENTIALS, MotoServer
from dagster_taskiq_cancel_tests.stack import Deployment

os.environ.update(LOCAL_CREDENTIALS)


@pytest.fixture(scope="session")
def sqs_server() -> Iterator[MotoServer]:
    server = MotoServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def deployment(tmp_path: Path, sqs_server: MotoServer) -> Iterator[Deployment]:
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
