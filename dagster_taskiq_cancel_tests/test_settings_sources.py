"""One settings source for every entry point: given fields, then the instance's launcher config,
then DAGSTER_TASKIQ_*, then the defaults; for the queue commands, the resource and the sensor."""

from __future__ import annotations

import math
import os
import uuid
from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster import DagsterRunStatus

from dagster_taskiq_cancel import TaskiqCancelResource, cancel_reconciliation_sensor
from dagster_taskiq_cancel.local_sqs import LocalSqsServer
from dagster_taskiq_cancel_tests.jobs import sleepy_job
from dagster_taskiq_cancel_tests.stack import MOTO_ONLY, Deployment, wait_for
from dagster_taskiq_cancel_tests.test_cli import cli

pytestmark = MOTO_ONLY


def home_with_launcher(root: Path, **config: object) -> Path:
    """A Dagster home whose dagster.yaml configures TaskiqRunLauncher with ``config``."""
    home = root / "home"
    home.mkdir()
    launcher = {"module": "dagster_taskiq_cancel", "class": "TaskiqRunLauncher", "config": config}
    (home / "dagster.yaml").write_text(
        yaml.safe_dump({"run_launcher": launcher, "telemetry": {"enabled": False}})
    )
    return home


def created(result_stdout: str) -> str:
    """The main queue `queues create` printed."""
    return result_stdout.splitlines()[0].split("\t")[0]


def test_queue_commands_read_dagster_yaml_then_the_environment(
    tmp_path: Path, sqs_server: LocalSqsServer
) -> None:
    from_yaml, from_env, given = (f"q{uuid.uuid4().hex[:8]}" for _ in range(3))
    home = home_with_launcher(tmp_path, queue_name=from_yaml, endpoint_url=sqs_server.endpoint_url)
    base = {k: v for k, v in os.environ.items() if not k.startswith("DAGSTER_")}
    env_only = {
        **base,
        "DAGSTER_TASKIQ_QUEUE_NAME": from_env,
        "DAGSTER_TASKIQ_ENDPOINT_URL": sqs_server.endpoint_url,
    }
    both = {**env_only, "DAGSTER_HOME": str(home)}
    cases = [
        ({**base, "DAGSTER_HOME": str(home)}, (), from_yaml),  # `make dev`'s dagster.yaml alone
        (env_only, (), from_env),  # no instance: the environment
        (both, (), from_yaml),  # the instance's launcher config wins over the environment
        (both, ("--queue-name", given), given),  # an option wins over everything
    ]
    for env, args, expected in cases:
        result = cli("queues", "create", *args, env=env)
        assert result.returncode == 0, result.stderr
        assert created(result.stdout) == expected
        status = cli("queues", "status", *args, env=env)
        assert status.returncode == 0, status.stderr
        assert expected in status.stdout


def test_resource_with_no_arguments_resolves_in_the_same_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = home_with_launcher(tmp_path, queue_name="from-yaml", grace_seconds=3)
    monkeypatch.setenv("DAGSTER_TASKIQ_QUEUE_NAME", "from-env")
    monkeypatch.setenv("DAGSTER_TASKIQ_NOTICE_SECONDS", "7")
    monkeypatch.setenv("DAGSTER_TASKIQ_SIGNING_KEYS", "k")  # AWS (no endpoint) needs a key
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    plain = dg.DagsterInstance.ephemeral()  # an instance with Dagster's own launcher
    with dg.build_resources({"taskiq": TaskiqCancelResource()}, instance=plain) as res:
        assert res.taskiq.settings.queue_name == "from-env"
    assert TaskiqCancelResource().settings.queue_name == "from-env"  # outside a run, no home
    ours = dg.DagsterInstance.from_config(str(home))
    try:
        resources = {"taskiq": TaskiqCancelResource(grace_seconds=1)}
        with dg.build_resources(resources, instance=ours) as res:
            settings = res.taskiq.settings
    finally:
        ours.dispose()
    assert (settings.queue_name, settings.grace_seconds, settings.notice_seconds) == (
        "from-yaml",  # the launcher config over the environment
        1,  # given over the launcher config
        7,  # the environment where the launcher config says nothing
    )
    monkeypatch.setenv("DAGSTER_HOME", str(home))  # a script outside a run, as the README's
    assert TaskiqCancelResource().settings.queue_name == "from-yaml"


def test_sensor_with_the_readme_resource_uses_the_launcher_settings(
    tmp_path: Path, sqs_server: LocalSqsServer
) -> None:
    """The README writes `TaskiqCancelResource()`: the sensor's queue and timeout must be the
    launcher's, not the defaults (a queue that does not exist, a timeout of 120 s)."""
    with Deployment(tmp_path, sqs_server.endpoint_url, cancel_timeout_seconds=0.5) as deployment:
        run_id = deployment.launch(sleepy_job)
        run = deployment.instance.get_run_by_id(run_id)
        assert run is not None
        deployment.instance.report_run_canceling(run)
        context = dg.build_sensor_context(
            instance=deployment.instance, resources={"taskiq": TaskiqCancelResource()}
        )

        def ticked_to_canceled() -> bool:
            result = cancel_reconciliation_sensor(context)
            assert isinstance(result, dg.SkipReason), result
            return deployment.status(run_id) == DagsterRunStatus.CANCELED

        wait_for(ticked_to_canceled, 30, "the sensor's timeout from the launcher config")


# (launcher config, what the one line must name besides dagster.yaml): a wrong type Dagster's
# schema rejects, a value our settings reject, a misspelt field, a config that is no mapping,
# an infinite time, no signing key for AWS, a key list with a hole.
BAD_LAUNCHER_CONFIGS: list[tuple[object, list[str]]] = [
    ({"poll_interval_seconds": "abc"}, ["poll_interval_seconds='abc'", "DAGSTER_TASKIQ_"]),
    ({"grace_seconds": -1}, ["grace_seconds=-1", "DAGSTER_TASKIQ_GRACE_SECONDS"]),
    ({"poll_interval": 1}, ["poll_interval=1", "did you mean poll_interval_seconds"]),
    ("abc", ["run_launcher:config must be dict"]),
    ({"grace_seconds": math.inf}, ["grace_seconds=inf", "DAGSTER_TASKIQ_GRACE_SECONDS"]),
    ({}, ["no signing key for the SQS endpoint AWS", "DAGSTER_TASKIQ_SIGNING_KEYS"]),
    ({"signing_keys": "a,,b"}, ["empty key", "DAGSTER_TASKIQ_SIGNING_KEYS"]),
]


@pytest.mark.parametrize("command", [["worker"], ["queues", "status"]])
def test_invalid_launcher_config_is_one_line_naming_field_value_and_where(
    tmp_path: Path, command: list[str]
) -> None:
    base = {k: v for k, v in os.environ.items() if not k.startswith("DAGSTER_")}
    for i, (config, named) in enumerate(BAD_LAUNCHER_CONFIGS):
        (tmp_path / str(i)).mkdir()
        home = home_with_launcher(tmp_path / str(i))
        instance = yaml.safe_load((home / "dagster.yaml").read_text())
        instance["run_launcher"]["config"] = config
        (home / "dagster.yaml").write_text(yaml.safe_dump(instance))
        result = cli(*command, env={**base, "DAGSTER_HOME": str(home)})
        assert result.returncode == 1, result.stderr
        assert "Traceback" not in result.stderr
        (line,) = result.stderr.strip().splitlines()
        for text in [*named, "dagster.yaml"]:
            assert text in line, line
