"""Dagster work on taskiq workers over AWS SQS that really stops when someone clicks Terminate."""

from dagster_taskiq_cancel.launcher import TaskiqRunLauncher
from dagster_taskiq_cancel.messages import CancelAck, CancelRequest
from dagster_taskiq_cancel.settings import TaskiqCancelSettings

__all__ = ["CancelAck", "CancelRequest", "TaskiqCancelSettings", "TaskiqRunLauncher"]
