"""TaskiqCancelResource: the settings as a Dagster resource, for sensors, ops and scripts."""

from __future__ import annotations

import functools
from typing import Any

import dagster as dg

from dagster_taskiq_cancel.broker import CancellableSqsBroker
from dagster_taskiq_cancel.cancel import request_cancel
from dagster_taskiq_cancel.queues import QueueNames, SyncQueues
from dagster_taskiq_cancel.settings import TaskiqCancelSettings, settings_from_env


class TaskiqCancelResource(dg.ConfigurableResource, TaskiqCancelSettings):
    """Access to one deployment's queues; its fields are exactly the settings' fields."""

    @classmethod
    def from_env(cls, **overrides: Any) -> TaskiqCancelResource:
        """From the ``DAGSTER_TASKIQ_*`` variables the workers read too, then ``overrides``."""
        return cls(**settings_from_env(overrides).model_dump(exclude_none=True))

    @property
    def settings(self) -> TaskiqCancelSettings:
        """Plain settings from this resource's fields, for code that takes settings."""
        return TaskiqCancelSettings(
            **{name: getattr(self, name) for name in TaskiqCancelSettings.model_fields}
        )

    @functools.cached_property
    def queues(self) -> SyncQueues:
        """Blocking SQS access (sensors run synchronously); one client per resource object."""
        return SyncQueues(self.settings)

    @property
    def queue_names(self) -> QueueNames:
        return QueueNames.from_setting(self.queue_name)

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
