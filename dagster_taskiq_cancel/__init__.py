"""Dagster work on taskiq workers over AWS SQS that really stops when someone clicks Terminate."""

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
    "CancelAck",
    "CancelRequest",
    "TaskiqCancelResource",
    "TaskiqCancelSettings",
    "TaskiqRunLauncher",
    "build_cancel_reconciliation_sensor",
    "cancel_reconciliation_sensor",
    "taskiq_executor",
]
