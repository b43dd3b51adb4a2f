"""The Dagster Components: fields in step with the resource, loaded from a defs folder, and
listed and scaffolded by the real ``dg`` command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from dagster.components.testing import create_defs_folder_sandbox

from dagster_taskiq_cancel import TaskiqCancelResource, taskiq_executor
from dagster_taskiq_cancel.components import (
    CancelReconciliationSensorComponent,
    TaskiqCancelResourceComponent,
    TaskiqExecutorComponent,
)
from dagster_taskiq_cancel.settings import SECRET_FIELDS

COMPONENTS = {
    f"dagster_taskiq_cancel.components.{cls.__name__}": cls
    for cls in (
        TaskiqCancelResourceComponent,
        CancelReconciliationSensorComponent,
        TaskiqExecutorComponent,
    )
}
DG = str(Path(sys.executable).with_name("dg"))


@pytest.fixture(autouse=True)
def _no_instance(monkeypatch: pytest.MonkeyPatch) -> None:
    """Resources resolve against the environment alone, not a developer's DAGSTER_HOME."""
    monkeypatch.delenv("DAGSTER_HOME", raising=False)


@pytest.mark.parametrize("component", [TaskiqCancelResourceComponent, TaskiqExecutorComponent])
def test_settings_fields_are_the_resources_fields(component: Any) -> None:
    """Every resource field but the secrets, optional, with the resource's description."""
    extra = {"resource_key"} if component is TaskiqCancelResourceComponent else {"max_concurrent"}
    resource_fields = TaskiqCancelResource.model_fields
    fields = {n: f for n, f in component.model_fields.items() if n not in extra}
    assert fields.keys() == resource_fields.keys() - SECRET_FIELDS
    for name, field in fields.items():
        assert field.annotation == resource_fields[name].annotation | None, name
        assert field.default is None, name
        assert field.description == resource_fields[name].description, name


def test_executor_component_fields_are_the_executors_settings() -> None:
    schema = taskiq_executor.config_schema.as_field().config_type.fields  # type: ignore[attr-defined]
    settings = set(TaskiqExecutorComponent.model_fields)
    assert settings <= set(schema)
    assert set(schema) - settings == {"tag_concurrency_limits", "retries"}


def _load(attributes_by_component: dict[Any, dict[str, Any]]) -> dg.Definitions:
    with create_defs_folder_sandbox() as sandbox:
        for component, attributes in attributes_by_component.items():
            sandbox.scaffold_component(
                component,
                defs_yaml_contents={"type": component.__module__ + "." + component.__name__}
                | {"attributes": attributes},
            )
        with sandbox.build_all_defs() as defs:
            return defs


def test_resource_sensor_and_executor_load_from_a_defs_folder() -> None:
    defs = _load(
        {
            TaskiqCancelResourceComponent: {
                "queue_name": "q-from-yaml",
                "grace_seconds": 3,
                "allow_unsigned": True,  # AWS, as no endpoint is given, and no key
            },
            CancelReconciliationSensorComponent: {"minimum_interval_seconds": 7},
            TaskiqExecutorComponent: {"poll_interval_seconds": 0.5, "max_concurrent": 2},
        }
    )
    resource = defs.resources["taskiq"]  # type: ignore[index]
    assert isinstance(resource, TaskiqCancelResource)
    assert resource.given() == {
        "queue_name": "q-from-yaml",
        "grace_seconds": 3,
        "allow_unsigned": True,
    }
    assert resource.settings.queue_name == "q-from-yaml"
    sensor = defs.resolve_sensor_def("cancel_reconciliation_sensor")
    assert sensor.minimum_interval_seconds == 7
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    assert "taskiq" in sensor.required_resource_keys
    executor = defs.executor
    assert isinstance(executor, dg.ExecutorDefinition)
    assert executor.name == "taskiq"
    config = executor.config_schema.resolve_config({}).value["config"]  # type: ignore[union-attr]
    assert config["poll_interval_seconds"] == 0.5
    assert config["max_concurrent"] == 2


def test_a_setting_out_of_range_fails_when_the_definitions_load() -> None:
    with pytest.raises(Exception) as raised:
        _load({TaskiqCancelResourceComponent: {"large_payload_threshold_bytes": 0}})
    causes = []
    error: BaseException | None = raised.value
    while error is not None:
        causes.append(str(error))
        error = error.__cause__
    expected = (
        "large_payload_threshold_bytes=0: Input should be greater than or equal to 1 (set it in "
        "the TaskiqCancelResourceComponent attributes in defs.yaml or as "
        "DAGSTER_TASKIQ_LARGE_PAYLOAD_THRESHOLD_BYTES)"
    )
    assert any(expected in cause for cause in causes), causes


def test_one_executor_per_code_location() -> None:
    with create_defs_folder_sandbox() as sandbox:
        for queue in ("a", "b"):
            sandbox.scaffold_component(
                TaskiqExecutorComponent,
                defs_yaml_contents={
                    "type": "dagster_taskiq_cancel.components.TaskiqExecutorComponent",
                    "attributes": {"queue_name": queue},
                },
            )
        with pytest.raises(Exception) as raised, sandbox.build_all_defs():
            pass
    assert "both have an executor" in str(raised.value.__cause__)


def test_dg_lists_and_scaffolds_the_components(tmp_path: Path) -> None:
    listed = subprocess.run(
        [DG, "list", "components", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        check=True,
    )
    items = {item["key"]: item["summary"] for item in json.loads(listed.stdout)["items"]}
    for key, cls in COMPONENTS.items():
        assert items[key] == cls.__doc__.splitlines()[0]
    project = tmp_path / "project"
    (project / "src" / "proj" / "defs").mkdir(parents=True)
    (project / "pyproject.toml").write_text(
        '[project]\nname = "proj"\nversion = "0"\n\n[tool.dg]\ndirectory_type = "project"\n\n'
        '[tool.dg.project]\nroot_module = "proj"\n'
    )
    key = "dagster_taskiq_cancel.components.TaskiqCancelResourceComponent"
    subprocess.run(
        [DG, "scaffold", "defs", key, "taskiq"],
        capture_output=True,
        timeout=120,
        cwd=project,
        check=True,
    )
    defs_yaml = project / "src" / "proj" / "defs" / "taskiq" / "defs.yaml"
    assert f"type: {key}" in defs_yaml.read_text()
