"""The README's first command as a new user runs it: `make dev` in a clean environment, Ctrl-C."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from dagster_taskiq_cancel.dev import descendants, use_aws
from dagster_taskiq_cancel.local_sqs import MinistackServer, free_port
from dagster_taskiq_cancel_tests.stack import graphql, pid_alive, wait_for

REPO = Path(__file__).resolve().parents[1]
LAUNCH = """mutation($p: ExecutionParams!) { launchRun(executionParams: $p) {
  __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message } } }"""
STATUS = """query($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }"""


def clean_env(home: Path) -> dict[str, str]:
    """What a fresh login has: no AWS_* variables, no DAGSTER_HOME, an empty home folder."""
    return {"PATH": os.environ["PATH"], "HOME": str(home)}


def checkout(tmp_path: Path) -> Path:
    """The repository files `make dev` reads, so that it writes .dagster_home here, not in REPO."""
    root = tmp_path / "repo"
    root.mkdir()
    for name in ("workspace.yaml", "dagster.yaml"):
        shutil.copy(REPO / name, root / name)
    shutil.copytree(REPO / "example_project", root / "example_project")
    return root


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except (urllib.error.URLError, OSError):
        return False


@pytest.fixture(params=["embedded", "ministack"])
def sqs_env(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    """The embedded moto `make dev` starts, or another local server named by its endpoint."""
    if request.param == "embedded":
        yield {}
        return
    server = MinistackServer().start()
    try:
        yield {"DAGSTER_TASKIQ_ENDPOINT_URL": server.endpoint_url}
    finally:
        server.stop()


def test_make_dev_in_a_clean_environment_runs_a_job_and_ctrl_c_is_quiet(
    tmp_path: Path, sqs_env: dict[str, str]
) -> None:
    root = checkout(tmp_path)
    (tmp_path / "home").mkdir()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    output = tmp_path / "dev.log"
    with output.open("wb") as log:
        dev = subprocess.Popen(
            [sys.executable, "-m", "dagster_taskiq_cancel", "dev", "--port", str(port)],
            cwd=root,
            env={**clean_env(tmp_path / "home"), **sqs_env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, as a terminal's foreground job
        )
    seen: set[int] = set()
    survivors: list[int] = []
    try:

        def up() -> bool:
            seen.update(descendants(dev.pid))
            assert dev.poll() is None, f"dev exited with {dev.returncode}:\n{output.read_text()}"
            return answers(f"{url}/server_info")

        wait_for(up, 180, "the UI to answer /server_info", interval=0.5)
        launcher = graphql(url, "{ instance { runLauncher { name } } }")
        assert launcher["instance"]["runLauncher"]["name"] == "TaskiqRunLauncher"
        job = {
            "repositoryLocationName": "example_project",
            "repositoryName": "__repository__",
            "jobName": "quick_job",
        }
        launched = graphql(url, LAUNCH, p={"selector": job, "runConfigData": {}})["launchRun"]
        assert launched["__typename"] == "LaunchRunSuccess", launched
        run_id = launched["run"]["runId"]

        def finished() -> str | None:
            seen.update(descendants(dev.pid))
            status = graphql(url, STATUS, id=run_id)["runOrError"]["status"]
            return status if status in ("SUCCESS", "FAILURE", "CANCELED") else None

        assert wait_for(finished, 120, f"run {run_id} finished", interval=0.5) == "SUCCESS"
        seen.update(descendants(dev.pid))
        os.killpg(dev.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        assert dev.wait(90) == 0
        with contextlib.suppress(AssertionError):
            wait_for(lambda: not any(pid_alive(p) for p in seen), 10, "every descendant gone")
    finally:
        if dev.poll() is None:
            dev.kill()
            dev.wait()
        survivors = [pid for pid in seen if pid_alive(pid)]
        for pid in survivors:
            os.kill(pid, signal.SIGKILL)
    text = output.read_text()
    assert "Traceback" not in text, text
    assert "Dagster UI: " in text
    assert not survivors, f"left running after Ctrl-C: {survivors}"
    assert (root / ".dagster_home" / "dagster.yaml").exists()


@pytest.mark.parametrize(
    ("value", "aws"),
    [("", False), ("0", False), ("false", False), ("FALSE", False), ("1", True), ("True", True)],
)
def test_use_aws_means_what_it_says(value: str, aws: bool) -> None:
    assert use_aws({"DAGSTER_TASKIQ_USE_AWS": value}) is aws
    assert use_aws({}) is False


def test_use_aws_other_than_true_or_false_is_a_one_line_error(tmp_path: Path) -> None:
    env = {**clean_env(tmp_path), "DAGSTER_TASKIQ_USE_AWS": "no thanks"}
    result = subprocess.run(
        [sys.executable, "-m", "dagster_taskiq_cancel", "dev", "--port", str(free_port())],
        cwd=checkout(tmp_path),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert "DAGSTER_TASKIQ_USE_AWS='no thanks'" in line, line
    assert "true or false" in line
    assert not (tmp_path / "repo" / ".dagster_home").exists()  # refused before starting anything
