"""The README's first command as a new user runs it: `make dev` in a clean environment, Ctrl-C."""

from __future__ import annotations

import contextlib
import json
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

from dagster_taskiq_cancel.dev import (
    HOME_DIR,
    RUNNING_FILE,
    descendants,
    join_running_demo,
    use_aws,
)
from dagster_taskiq_cancel.local_sqs import MinistackServer, free_port
from dagster_taskiq_cancel_tests.stack import graphql, pid_alive, wait_for

REPO = Path(__file__).resolve().parents[1]
LAUNCH = """mutation($p: ExecutionParams!) { launchRun(executionParams: $p) {
  __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message } } }"""
STATUS = """query($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }"""


def clean_env(home: Path) -> dict[str, str]:
    """What a fresh login has: no AWS_* variables, no DAGSTER_HOME, an empty home folder (and
    PYTHONPATH, when set, for the code under test)."""
    kept = {k: os.environ[k] for k in ("PATH", "PYTHONPATH") if k in os.environ}
    return {**kept, "HOME": str(home)}


def checkout(tmp_path: Path) -> Path:
    """The repository files `make dev` reads, so that it writes its runs here, not in REPO."""
    root = tmp_path / "repo"
    (root / HOME_DIR).mkdir(parents=True)
    shutil.copy(REPO / "workspace.yaml", root / "workspace.yaml")
    shutil.copy(REPO / HOME_DIR / "dagster.yaml", root / HOME_DIR / "dagster.yaml")
    shutil.copytree(REPO / "example_project", root / "example_project")
    return root


def cli(root: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """A CLI command run in ``root``; it must succeed."""
    done = subprocess.run(
        [sys.executable, "-m", "dagster_taskiq_cancel", *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, (args, done.stdout, done.stderr)
    return done


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

        def run_job(name: str) -> str:
            """Launch the example project's job ``name`` as the UI does; its run id once it
            succeeded."""
            job = {
                "repositoryLocationName": "example_project",
                "repositoryName": "__repository__",
                "jobName": name,
            }
            launched = graphql(url, LAUNCH, p={"selector": job, "runConfigData": {}})
            assert launched["launchRun"]["__typename"] == "LaunchRunSuccess", launched
            run_id = launched["launchRun"]["run"]["runId"]

            def finished() -> str | None:
                seen.update(descendants(dev.pid))
                status = graphql(url, STATUS, id=run_id)["runOrError"]["status"]
                return status if status in ("SUCCESS", "FAILURE", "CANCELED") else None

            assert wait_for(finished, 120, f"run {run_id} finished", interval=0.5) == "SUCCESS"
            return run_id

        run_id = run_job("quick_job")
        run_job("gpu_job")  # its embeddings step only the demo's gpu worker takes
        seen.update(descendants(dev.pid))
        # No options, no DAGSTER_HOME: a command run where the demo runs reaches it.
        env = {**clean_env(tmp_path / "home"), **sqs_env}
        status = cli(root, env, "queues", "status")
        assert json.loads(status.stdout)["dagster-taskiq"]["visible"] == 0, status.stderr
        cli(root, env, "health")  # the worker's /readyz answers 200
        assert (
            f"{run_id}  SUCCESS" in cli(root, env, "cancel", "--run-id", run_id, "--dry-run").stdout
        )
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
    assert not (root / HOME_DIR / RUNNING_FILE).exists()
    for noise in ("will not be used", "Context impl", "Found credentials", "superseded"):
        assert noise not in text, noise


@pytest.mark.parametrize(
    ("value", "aws"),
    [("", False), ("0", False), ("false", False), ("FALSE", False), ("1", True), ("True", True)],
)
def test_use_aws_means_what_it_says(value: str, aws: bool) -> None:
    assert use_aws({"DAGSTER_TASKIQ_USE_AWS": value}) is aws
    assert use_aws({}) is False


def refused_dev(root: Path, env: dict[str, str], prelude: str = "") -> str:
    """`dev` run in ``root`` (after ``prelude`` code, in-process), which must refuse to start:
    exit 1, no banner, one line of error without traceback, and nothing left in its home."""
    cli = f"{prelude}from dagster_taskiq_cancel.cli import main; main()"
    result = subprocess.run(
        [sys.executable, "-c", cli, "dev", "--port", str(free_port())],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stdout == ""  # no banner
    assert RUNNING_FILE not in {p.name for p in (root / HOME_DIR).iterdir()}
    (line,) = result.stderr.strip().splitlines()
    return line


def test_use_aws_other_than_true_or_false_is_a_one_line_error(tmp_path: Path) -> None:
    root = checkout(tmp_path)
    line = refused_dev(root, {**clean_env(tmp_path), "DAGSTER_TASKIQ_USE_AWS": "no thanks"})
    assert "DAGSTER_TASKIQ_USE_AWS='no thanks'" in line, line
    assert "true or false" in line
    assert [p.name for p in (root / HOME_DIR).iterdir()] == ["dagster.yaml"]  # refused at once


def test_a_bad_setting_in_the_demo_config_is_one_line_before_anything_starts(
    tmp_path: Path,
) -> None:
    root = checkout(tmp_path)
    config = root / HOME_DIR / "dagster.yaml"
    good = config.read_text()
    for bad, named in [
        (good.replace("grace_seconds: 10", "grace_seconds: soon"), "grace_seconds='soon'"),
        (
            good.replace("max_concurrent_runs: 10", "max_concurrent_runs: x"),
            'root:max_concurrent_runs. Value "x"',
        ),
    ]:
        config.write_text(bad)
        line = refused_dev(root, clean_env(tmp_path))
        assert named in line, line
        assert "object at 0x" not in line  # none of Dagster's schema dump


def test_a_command_joins_the_running_demo_only_where_nothing_else_is_set(tmp_path: Path) -> None:
    home = tmp_path / HOME_DIR
    home.mkdir()
    endpoint = "DAGSTER_TASKIQ_ENDPOINT_URL"
    running = {endpoint: "http://127.0.0.1:4566", "DAGSTER_TASKIQ_METRICS_PORT": "9100"}
    (home / RUNNING_FILE).write_text(json.dumps({"pid": os.getpid(), "environment": running}))
    env: dict[str, str] = {}
    assert "DAGSTER_HOME is not set" in (join_running_demo(env, tmp_path) or "")
    assert env == {"DAGSTER_HOME": str(home), **running}
    mine = {"DAGSTER_HOME": str(home), endpoint: "http://127.0.0.1:9999"}
    env = dict(mine)
    assert join_running_demo(env, tmp_path / "elsewhere") is None
    assert env == {**running, **mine}  # the user's own endpoint wins
    env = {}
    join_running_demo(env, tmp_path, skip={"DAGSTER_TASKIQ_METRICS_PORT"})  # as `worker` does
    assert "DAGSTER_TASKIQ_METRICS_PORT" not in env
    env = {"DAGSTER_HOME": str(tmp_path / "production")}
    assert join_running_demo(env, tmp_path) is None
    assert env == {"DAGSTER_HOME": str(tmp_path / "production")}  # not the demo's instance
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    stale = {"pid": int(gone.stdout), "environment": running}  # a demo killed by SIGKILL
    (home / RUNNING_FILE).write_text(json.dumps(stale))
    env = {}
    assert join_running_demo(env, tmp_path) is None
    assert env == {}


def test_dev_without_its_extra_says_what_to_install(tmp_path: Path) -> None:
    blocked = "import sys; sys.modules['moto'] = None; sys.modules['dagster_webserver'] = None; "
    line = refused_dev(checkout(tmp_path), clean_env(tmp_path), prelude=blocked)
    assert "dagster_webserver, moto not installed" in line, line
    assert "pip install 'dagster-taskiq-cancel[dev]'" in line
