"""Dagster work on taskiq workers over AWS SQS that really stops when someone clicks Terminate."""

__version__ = "0.1.0"

from dagster_taskiq_cancel.bulk import BulkCancelResult, EmptyFilterError, cancel_runs
from dagster_taskiq_cancel.cancel import CancelOutcome
from dagster_taskiq_cancel.cleanup import CleanupContext, cleanup_on_cancel
from dagster_taskiq_cancel.cooperative import cancellation_requested
from dagster_taskiq_cancel.executor import taskiq_executor
from dagster_taskiq_cancel.launcher import TaskiqRunLauncher
from dagster_taskiq_cancel.messages import CancelAck, CancelRequest
from dagster_taskiq_cancel.resource import TaskiqCancelResource
from dagster_taskiq_cancel.sensor import (
    build_cancel_reconciliation_sensor,
    cancel_reconciliation_sensor,
)
from dagster_taskiq_cancel.settings import TaskiqCancelSettings

__all__ = [
    "BulkCancelResult",
    "CancelAck",
    "CancelOutcome",
    "CancelRequest",
    "CleanupContext",
    "EmptyFilterError",
    "TaskiqCancelResource",
    "TaskiqCancelSettings",
    "TaskiqRunLauncher",
    "__version__",
    "build_cancel_reconciliation_sensor",
    "cancel_reconciliation_sensor",
    "cancel_runs",
    "cancellation_requested",
    "cleanup_on_cancel",
    "taskiq_executor",
]
