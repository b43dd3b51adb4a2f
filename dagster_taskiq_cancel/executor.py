"""taskiq_executor: every step of a run on the taskiq workers, cancellable like the run itself."""

from __future__ import annotations

import dagster as dg
from dagster._core.execution.retries import RetryMode, get_retries_config
from dagster._core.execution.tags import get_tag_concurrency_limits_config
from dagster._core.executor.base import Executor
from dagster._core.executor.step_delegating import StepDelegatingExecutor

from dagster_taskiq_cancel.settings import TaskiqCancelSettings, config_fields, resolve_settings
from dagster_taskiq_cancel.step_handler import TaskiqStepHandler
from dagster_taskiq_cancel.tasks import EXECUTOR_NAME


def _config_schema() -> dict[str, dg.Field]:
    """The settings fields (optional, falling back to the launcher) plus the step limits.

    The signing key is not among them: it comes from the launcher or the environment only.
    """
    return {
        **config_fields(secrets=False),
        "max_concurrent": dg.Field(
            int,
            is_required=False,
            description="Steps of one run on the queue or running at once; unlimited if unset.",
        ),
        "tag_concurrency_limits": get_tag_concurrency_limits_config(),
        "retries": get_retries_config(),
    }


def _settings(init_context: dg.InitExecutorContext) -> TaskiqCancelSettings:
    overrides = {
        k: v
        for k, v in init_context.executor_config.items()
        if k in TaskiqCancelSettings.model_fields
    }
    return resolve_settings(init_context.instance, overrides)


def _health_check_interval(settings: TaskiqCancelSettings) -> int:
    """A third of the shorter timeout the step health check answers from, at most Dagster's
    default of 20 s: a lost step fails within about 1.3 times its timeout."""
    shortest = min(settings.heartbeat_timeout_seconds, settings.step_claim_timeout_seconds)
    return max(1, min(20, int(shortest / 3)))


@dg.executor(
    name=EXECUTOR_NAME,
    config_schema=_config_schema(),
    requirements=dg.multiple_process_executor_requirements(),
)
def taskiq_executor(init_context: dg.InitExecutorContext) -> Executor:
    """Send each step to the taskiq workers on SQS as its own task.

    Settings not given here come from the instance's ``TaskiqRunLauncher`` (or the
    ``DAGSTER_TASKIQ_*`` environment), so one dagster.yaml configures runs and steps alike.
    Terminating the run stops every step on whichever worker holds it.
    """
    config = init_context.executor_config
    settings = _settings(init_context)
    return StepDelegatingExecutor(
        TaskiqStepHandler(settings),
        retries=RetryMode.from_config(config["retries"]),  # type: ignore[arg-type]
        max_concurrent=config.get("max_concurrent"),
        tag_concurrency_limits=config.get("tag_concurrency_limits"),
        should_verify_step=True,
        check_step_health_interval_seconds=_health_check_interval(settings),
    )
