"""Dagster Components: the resource, the reconciliation sensor and the executor, from YAML.

Registered under the ``dagster_dg_cli.registry_modules`` entry point, so ``dg list components``
shows them and ``dg scaffold defs dagster_taskiq_cancel.components.<Class> <path>`` writes a
``defs.yaml``. Their settings fields are made from the one settings class, all
optional: a field left out falls back, as everywhere, to the instance's ``TaskiqRunLauncher``
config, then ``DAGSTER_TASKIQ_*``, then the default. The signing key is not a field: YAML
templates resolve to the value, which would then show in the UI; it comes from the environment.
"""

from __future__ import annotations

from typing import Any, Literal

import dagster as dg
from pydantic import Field, create_model

from dagster_taskiq_cancel.executor import taskiq_executor
from dagster_taskiq_cancel.resource import TaskiqCancelResource
from dagster_taskiq_cancel.sensor import build_cancel_reconciliation_sensor
from dagster_taskiq_cancel.settings import SECRET_FIELDS, TaskiqCancelSettings, build_settings

RESOURCE_KEY = "taskiq"  # the reconciliation sensor's resource parameter


def _optional_settings_fields() -> dict[str, Any]:
    """Every non-secret setting as an optional field (None: not given) with its description."""
    return {
        name: (field.annotation | None, Field(default=None, description=field.description))
        for name, field in TaskiqCancelSettings.model_fields.items()
        if name not in SECRET_FIELDS
    }


# The settings part of the resource and executor components, generated so it cannot drift.
SettingsAttributes = create_model(
    "SettingsAttributes", __base__=dg.Model, **_optional_settings_fields()
)


def given_settings(attributes: dg.Model) -> dict[str, Any]:
    """The settings fields set in the YAML (the others fall back at run time), checked now so
    that a wrong value fails the code location's load with the one-line settings error."""
    given = {
        name: value
        for name in _optional_settings_fields()
        if (value := getattr(attributes, name)) is not None
    }
    build_settings(given, where=f"the {type(attributes).__name__} attributes in defs.yaml")
    return given


class TaskiqCancelResourceComponent(dg.Component, dg.Resolvable, SettingsAttributes):  # type: ignore[misc, valid-type]
    """A TaskiqCancelResource (one deployment's queues), bound under resource_key."""

    resource_key: str = Field(
        default=RESOURCE_KEY,
        description="Key the resource is bound to; the reconciliation sensor needs `taskiq`.",
    )

    @property
    def resource(self) -> TaskiqCancelResource:
        return TaskiqCancelResource(**given_settings(self))

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        return dg.Definitions(resources={self.resource_key: self.resource})


class TaskiqExecutorComponent(dg.Component, dg.Resolvable, SettingsAttributes):  # type: ignore[misc, valid-type]
    """taskiq_executor as the code location's default executor (Dagster allows one)."""

    max_concurrent: int | None = Field(
        default=None,
        description="Steps of one run on the queue or running at once; unlimited if unset.",
    )

    @property
    def executor(self) -> dg.ExecutorDefinition:
        config = given_settings(self)
        if self.max_concurrent is not None:
            config["max_concurrent"] = self.max_concurrent
        return taskiq_executor.configured(config) if config else taskiq_executor

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        return dg.Definitions(executor=self.executor)


class CancelReconciliationSensorComponent(dg.Component, dg.Resolvable, dg.Model):
    """The sensor that ends CANCELING runs from worker acks; needs the taskiq resource."""

    name: str = Field(default="cancel_reconciliation_sensor", description="The sensor's name.")
    minimum_interval_seconds: int = Field(default=5, ge=1, description="Seconds between ticks.")
    max_acks_per_tick: int = Field(default=100, ge=1, description="Acks one tick reads at most.")
    ack_wait_seconds: int = Field(
        default=0,
        ge=0,
        le=20,
        description=(
            "Long poll at the start of each tick; a tick holds the sensor daemon (every sensor, "
            "unless sensors.use_threads) this long more."
        ),
    )
    default_status: Literal["running", "stopped"] = Field(
        default="running", description="Whether the sensor runs without being switched on."
    )

    @property
    def sensor(self) -> dg.SensorDefinition:
        return build_cancel_reconciliation_sensor(
            name=self.name,
            minimum_interval_seconds=self.minimum_interval_seconds,
            max_acks_per_tick=self.max_acks_per_tick,
            default_status=dg.DefaultSensorStatus(self.default_status.upper()),
            ack_wait_seconds=self.ack_wait_seconds,
        )

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        return dg.Definitions(sensors=[self.sensor])
