"""Which of a worker's children get the signing keys: only a run process that sends step tasks.

Every child runs user code (ops, resources, cleanup handlers), and a key there could sign any
task, cancel request or ack. A run whose executor is ``taskiq_executor`` signs its step tasks, so
its run (or resume) process keeps the keys; every other child gets the key variables empty and
``KEY_WITHHELD_ENV`` set, which lets its settings load with no key (it sends nothing a worker must
trust). Keys written into dagster.yaml itself travel with the instance and cannot be withheld.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from dagster import DagsterInstance, DagsterRun

from dagster_taskiq_cancel.settings import (
    KEY_ENV_VARS,
    KEY_WITHHELD_ENV,
    SECRET_FIELDS,
    TaskiqCancelSettings,
)
from dagster_taskiq_cancel.tasks import EXECUTOR_NAME

logger = logging.getLogger(__name__)


def sends_steps(instance: DagsterInstance, run: DagsterRun) -> bool:
    """Whether ``run`` executes on ``taskiq_executor`` (read from its execution plan)."""
    if run.execution_plan_snapshot_id is None:
        return False
    plan = instance.get_execution_plan_snapshot(run.execution_plan_snapshot_id)
    return plan.executor_name == EXECUTOR_NAME


def child_env(env: Mapping[str, str], keep_keys: bool) -> dict[str, str]:
    """``env`` for a child: as it is when the child signs steps, else with the keys withheld."""
    if keep_keys:
        return dict(env)
    return {**env, **dict.fromkeys(KEY_ENV_VARS, ""), KEY_WITHHELD_ENV: "1"}


def warn_if_written(instance: DagsterInstance) -> None:
    """Warn when dagster.yaml holds a key itself (not ``{env: …}``): it then travels with the
    instance to every child, and the UI shows it on its configuration page."""
    data = getattr(instance.run_launcher, "inst_data", None)
    config = data.config_dict if data is not None else {}
    for name in sorted(SECRET_FIELDS & config.keys()):
        if isinstance(config[name], str):
            logger.warning(
                "%s is written in dagster.yaml: every run and step process gets it with the "
                "instance, and the UI shows it; give it as %s in the environment instead",
                name,
                TaskiqCancelSettings.env_var(name),
            )
