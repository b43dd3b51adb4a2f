"""TaskiqCancelResource: the settings as a Dagster resource, for sensors, ops and scripts."""

from __future__ import annotations

import functools
from typing import Any

import dagster as dg
from pydantic import PrivateAttr

from dagster_taskiq_cancel.broker import CancellableSqsBroker
from dagster_taskiq_cancel.cancel import request_cancel
from dagster_taskiq_cancel.queues import QueueNames, SyncQueues
from dagster_taskiq_cancel.settings import (
    SECRET_FIELDS,
    TaskiqCancelSettings,
    current_settings,
    resolve_settings,
    settings_from_env,
)


class TaskiqCancelResource(dg.ConfigurableResource, TaskiqCancelSettings):
    """Access to one deployment's queues; its fields are exactly the settings' fields.

    Fields given explicitly win; the others come, as for every entry point, from the instance's
    ``TaskiqRunLauncher`` config, then ``DAGSTER_TASKIQ_*``, then the defaults. Read the result
    from ``settings``, never from the fields, which hold only what was given. As when Dagster
    rebuilds a resource for a run, a field given with its default value counts as not given.
    """

    _resolved: TaskiqCancelSettings | None = PrivateAttr(default=None)

    @classmethod
    def from_env(cls, **overrides: Any) -> TaskiqCancelResource:
        """Pinned to the ``DAGSTER_TASKIQ_*`` variables of this process, then ``overrides``.

        The signing keys are given as ``EnvVar``s, so the UI shows the variable, not the key.
        """
        values = settings_from_env(overrides).model_dump(exclude_none=True)
        for name in SECRET_FIELDS & values.keys() - overrides.keys():
            values[name] = dg.EnvVar(TaskiqCancelSettings.env_var(name))
        return cls(**values)

    def given(self) -> dict[str, Any]:
        """The fields set explicitly (in code or in the run's resource config), ``EnvVar``s read."""
        return {
            name: value.get_value() if isinstance(value, dg.EnvVar) else value
            for name, value in ((n, getattr(self, n)) for n in self.model_fields_set)
        }

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        """In a run or a sensor: resolve against the instance it runs on."""
        if context.instance is not None:
            self._resolved = resolve_settings(context.instance, self.given())

    @property
    def settings(self) -> TaskiqCancelSettings:
        """The resolved settings, for code that takes settings."""
        if self._resolved is None:
            self._resolved = current_settings(self.given())
        return self._resolved

    @functools.cached_property
    def queues(self) -> SyncQueues:
        """Blocking SQS access (sensors run synchronously); one client per resource object."""
        return SyncQueues(self.settings)

    @property
    def queue_names(self) -> QueueNames:
        return QueueNames.from_setting(self.settings.queue_name)

    def broker(self) -> CancellableSqsBroker:
        """A new, not yet started async broker, for asyncio code that sends or receives."""
        return CancellableSqsBroker(self.settings)

    def cancel_run(
        self,
        instance: dg.DagsterInstance,
        run_id: str,
        reason: str,
        requested_by: str = "resource",
    ) -> bool:
        """Cancel as the launcher's terminate() does: record CANCELING, then hint the workers."""
        return request_cancel(instance, self.queues, run_id, reason, requested_by)
