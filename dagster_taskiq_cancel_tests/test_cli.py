"""`dagster-taskiq-cancel queues`: idempotent creation and errors that say what to change."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid

from click.testing import CliRunner

import dagster_taskiq_cancel
from dagster_taskiq_cancel.cli import main
from dagster_taskiq_cancel.local_sqs import LocalSqsServer, free_port
from dagster_taskiq_cancel.queues import SyncQueues
from dagster_taskiq_cancel.settings import TaskiqCancelSettings
from dagster_taskiq_cancel.tasks import run_task_message
from dagster_taskiq_cancel_tests.stack import MOTO_ONLY, Deployment, child_pids, pid_alive, wait_for


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dagster_taskiq_cancel", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env or dict(os.environ),
    )


def test_queues_create_is_idempotent_and_status_counts(sqs_server: LocalSqsServer) -> None:
    for queue in (f"q{uuid.uuid4().hex[:8]}", f"q{uuid.uuid4().hex[:8]}.fifo"):
        args = ("--queue-name", queue, "--endpoint-url", sqs_server.endpoint_url)
        first = cli("queues", "create", *args)
        second = cli("queues", "create", *args)
        assert first.returncode == 0, first.stderr
        assert first.stdout == second.stdout
        base, _, suffix = queue.partition(".")
        suffix = f".{suffix}" if suffix else ""
        created = [line.split("\t")[0] for line in first.stdout.splitlines()]
        assert created == [queue, f"{base}-cancels{suffix}", f"{base}-cancel-acks{suffix}"]
        status = cli("queues", "status", *args)
        depth = json.loads(status.stdout)[queue]
        assert (depth["visible"], depth["in_flight"], depth["backlog_per_slot"]) == (0, 0, 0)


def test_unreachable_endpoint_is_a_clear_error() -> None:
    result = cli("queues", "create", "--endpoint-url", f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 1
    assert "cannot reach http://127.0.0.1" in result.stderr
    assert "Traceback" not in result.stderr


def no_aws_env() -> dict[str, str]:
    """The environment without AWS credentials, profiles or instance metadata."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_CONFIG_FILE="/dev/null",
        AWS_SHARED_CREDENTIALS_FILE="/dev/null",
        AWS_EC2_METADATA_DISABLED="true",
    )
    return env


def test_missing_credentials_for_aws_is_a_clear_error() -> None:
    env = {**no_aws_env(), "DAGSTER_TASKIQ_SIGNING_KEYS": "k"}  # AWS needs a key too
    result = cli("queues", "create", "--queue-name", "q", env=env)
    assert result.returncode == 1
    assert "no AWS credentials found" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_server_on_this_machine_needs_no_credentials(sqs_server: LocalSqsServer) -> None:
    for host in ("127.0.0.1", "localhost"):
        endpoint = sqs_server.endpoint_url.replace("127.0.0.1", host)
        result = cli("queues", "create", "--endpoint-url", endpoint, env=no_aws_env())
        assert result.returncode == 0, result.stderr


def test_missing_queue_and_bad_setting_are_clear_errors(sqs_server: LocalSqsServer) -> None:
    missing = cli(
        "queues", "status", "--queue-name", "nope", "--endpoint-url", sqs_server.endpoint_url
    )
    assert missing.returncode == 1
    assert "dagster-taskiq-cancel queues create" in missing.stderr
    bad = cli("queues", "status", "--concurrency", "0")
    assert bad.returncode == 1
    assert "DAGSTER_TASKIQ_CONCURRENCY" in bad.stderr


def test_worker_without_dagster_home_says_what_to_set() -> None:
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/")}
    for args in ((), ("--workers", "2")):
        result = cli("worker", *args, env=env)
        assert result.returncode == 1
        (line,) = result.stderr.strip().splitlines()  # one line, no traceback
        assert line.startswith("Error: DAGSTER_HOME is not set: set it to the folder")


def test_setting_options_are_typed() -> None:
    bad = cli("queues", "status", "--concurrency", "four")
    assert bad.returncode == 2
    assert "'four' is not a valid integer" in bad.stderr
    assert "is not a valid float" in cli("worker", "--grace-seconds", "soon").stderr
    usage = cli("worker", "--help").stdout
    assert "--grace-seconds FLOAT" in usage
    assert "--concurrency INTEGER" in usage
    assert "--queue-name TEXT" in usage
    assert "--metrics-port INTEGER" in usage


def test_cancel_without_dagster_home_says_it_needs_the_runs_instance() -> None:
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/")}
    result = cli("cancel", "--run-id", str(uuid.uuid4()), "--yes", env=env)
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()  # one line, no traceback
    assert line.startswith("Error: DAGSTER_HOME is not set: `cancel` needs it"), line
    assert "the instance your runs live in" in line
    assert "workers" not in line


@MOTO_ONLY
def test_workers_parent_exits_non_zero_at_once_when_a_child_dies(deployment: Deployment) -> None:
    parent = deployment.start_worker("--workers", "2")
    wait_for(lambda: deployment.worker_log(0).count(" ready") == 2, 60, "both children ready")
    children = child_pids(parent.pid, "dagster_taskiq_cancel")
    assert len(children) == 2
    try:
        os.kill(children[0], signal.SIGKILL)
        wait_for(lambda: parent.poll() is not None, 30, "the parent to exit")
        assert parent.returncode != 0
        wait_for(lambda: not pid_alive(children[1]), 10, "the other child stopped")
    finally:
        for pid in children:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


@MOTO_ONLY
def test_queues_status_warns_when_no_signing_key_is_set(sqs_server: LocalSqsServer) -> None:
    args = ("queues", "status", "--endpoint-url", sqs_server.endpoint_url)
    assert cli("queues", "create", *args[2:]).returncode == 0
    env = {k: v for k, v in os.environ.items() if k != "DAGSTER_TASKIQ_SIGNING_KEY"}
    unsigned = cli(*args, env=env)
    assert unsigned.returncode == 0, unsigned.stderr
    assert "no signing key" in unsigned.stderr
    signed = cli(*args, env={**env, "DAGSTER_TASKIQ_SIGNING_KEY": "team-secret"})
    assert signed.returncode == 0, signed.stderr
    assert "signing key" not in signed.stderr
    assert "team-secret" not in signed.stdout + signed.stderr


@MOTO_ONLY
def test_queues_status_prints_backlog_per_worker_slot(sqs_server: LocalSqsServer) -> None:
    queue = f"q{uuid.uuid4().hex[:8]}"
    args = ("--queue-name", queue, "--endpoint-url", sqs_server.endpoint_url)
    settings = TaskiqCancelSettings(queue_name=queue, endpoint_url=sqs_server.endpoint_url)
    queues = SyncQueues(settings)
    queues.create_all()
    tasks = [run_task_message(f"run-{index}") for index in range(5)]
    assert not queues.send_batch(queue, [(t.body, t.task_id, t.task_id) for t in tasks])
    for options, slots, per_slot, replicas in [
        (("--concurrency", "2"), 2, 2.5, 3),  # slots from the setting (or DAGSTER_TASKIQ_*)
        (("--concurrency", "4", "--workers", "2"), 8, 0.625, 1),  # `worker --workers 2` each
    ]:
        status = cli("queues", "status", *args, *options)
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)[queue] == {
            "visible": 5,
            "in_flight": 0,
            "slots_per_replica": slots,
            "backlog_per_slot": per_slot,
            "replicas_for_backlog": replicas,
        }
    bad = cli("queues", "status", *args, "--workers", "0")
    assert bad.returncode == 2
    assert "--workers" in bad.stderr


@MOTO_ONLY
def test_queues_create_and_status_work_per_pool(sqs_server: LocalSqsServer) -> None:
    """One autoscaler per pool: `status --queue gpu` gives the gpu queue's own backlog."""
    queue = f"q{uuid.uuid4().hex[:8]}"
    args = ("--queue-name", queue, "--endpoint-url", sqs_server.endpoint_url)
    created = cli("queues", "create", *args, "--queue", "gpu", "--queue", "cpu")
    assert created.returncode == 0, created.stderr
    listed = {line.split("\t")[0] for line in created.stdout.splitlines()}
    assert listed == {
        queue,
        f"{queue}-cancels",
        f"{queue}-cancel-acks",
        f"{queue}-gpu",
        f"{queue}-cpu",
    }
    queues = SyncQueues(
        TaskiqCancelSettings(queue_name=queue, endpoint_url=sqs_server.endpoint_url)
    )
    tasks = [run_task_message(f"run-{index}") for index in range(3)]
    assert not queues.send_batch(f"{queue}-gpu", [(t.body, t.task_id, t.task_id) for t in tasks])
    status = cli("queues", "status", *args, "--queue", "gpu", "--concurrency", "2")
    assert status.returncode == 0, status.stderr
    depths = json.loads(status.stdout)
    assert depths[f"{queue}-gpu"]["replicas_for_backlog"] == 2
    assert depths[queue]["replicas_for_backlog"] == 0
    bad = cli("queues", "create", *args, "--queue", "cancels")
    assert bad.returncode == 1
    assert "not a usable pool name" in bad.stderr


LANES = ("--priority-lanes",)


def test_each_command_lists_only_the_settings_it_reads() -> None:
    """In-process (click's runner): help and version need no subprocess."""
    every = {f"--{name.replace('_', '-')}" for name in TaskiqCancelSettings.model_fields}
    for command, expected in [
        (("queues", "create"), {"--queue-name", "--region-name", "--endpoint-url", *LANES}),
        (("queues", "purge"), {"--queue-name", "--region-name", "--endpoint-url", *LANES}),
        (
            ("queues", "status"),
            {"--queue-name", "--region-name", "--endpoint-url", "--concurrency", *LANES},
        ),
        (("health",), {"--metrics-port", "--metrics-host"}),
        (("worker",), every),
    ]:
        usage = CliRunner().invoke(main, [*command, "--help"]).output
        listed = {option for option in every if f"{option} " in usage}
        assert listed == expected, command
        assert "None" not in usage, command  # said in words: what happens when it is unset


def test_version_and_cancel_statuses_in_one_case() -> None:
    version = cli("--version")
    assert version.returncode == 0
    assert (
        version.stdout.strip()
        == f"dagster-taskiq-cancel, version {dagster_taskiq_cancel.__version__}"
    )
    usage = " ".join(CliRunner().invoke(main, ["cancel", "--help"]).output.split())
    assert "--status [QUEUED|NOT_STARTED|STARTING|STARTED|CANCELING]" in usage
    assert "[default: QUEUED, NOT_STARTED, STARTING, STARTED]" in usage


def test_the_worker_and_the_demo_say_they_run_on_linux_only() -> None:
    elsewhere = (  # after the imports, which read the real platform
        "import sys; from dagster_taskiq_cancel.cli import main; sys.platform = 'darwin'; main()"
    )
    for command in ("worker", "dev"):
        result = subprocess.run(
            [sys.executable, "-c", elsewhere, command],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 1
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith("Error: the worker runs on Linux only"), line
        assert "darwin" in line
