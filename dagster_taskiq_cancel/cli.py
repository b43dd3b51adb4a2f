"""``dagster-taskiq-cancel``: worker and queue administration.

Every settings field is also an option (``--poll-interval-seconds``); options override the
``DAGSTER_TASKIQ_*`` environment, which overrides the defaults.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

import click

from dagster_taskiq_cancel.queues import SqsError, SyncQueues
from dagster_taskiq_cancel.settings import (
    SettingsError,
    TaskiqCancelSettings,
    resolve_settings,
    settings_from_env,
)


def settings_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add one option per settings field; the command receives them as ``**overrides``."""
    for name, field in reversed(TaskiqCancelSettings.model_fields.items()):
        command = click.option(
            f"--{name.replace('_', '-')}",
            name,
            default=None,
            help=f"{field.description} [env {TaskiqCancelSettings.env_var(name)}]",
        )(command)
    return command


def load_settings(overrides: dict[str, Any]) -> TaskiqCancelSettings:
    try:
        return settings_from_env(overrides)
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None


def admin(fn: Callable[[SyncQueues], Any], overrides: dict[str, Any]) -> Any:
    try:
        return fn(SyncQueues(load_settings(overrides)))
    except SqsError as exc:
        raise click.ClickException(str(exc)) from None


@click.group()
def main() -> None:
    """Dagster work on taskiq workers over SQS that stops when you click Terminate."""


@main.command()
@click.option("--workers", default=1, show_default=True, help="Worker processes to start.")
@settings_options
def worker(workers: int, **overrides: Any) -> None:
    """Run worker processes: execute runs and steps, stop them when their run is cancelled."""
    if workers > 1:
        args = ["worker", "--workers", "1"]
        for name, value in overrides.items():
            if value is not None:
                args += [f"--{name.replace('_', '-')}", str(value)]
        sys.exit(_run_processes(args, workers))
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from dagster import DagsterInstance

    from dagster_taskiq_cancel.worker.process import serve

    instance = DagsterInstance.get()
    settings = worker_settings(instance, overrides)
    try:
        asyncio.run(serve(settings, instance))
    except SqsError as exc:
        raise click.ClickException(str(exc)) from None


def worker_settings(instance: Any, overrides: dict[str, Any]) -> TaskiqCancelSettings:
    """The instance's launcher settings when it uses ours (one config for both), else the env."""
    try:
        return resolve_settings(instance, overrides)
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None


def _run_processes(args: list[str], count: int) -> int:
    from dagster_taskiq_cancel.worker.process import run_processes

    return run_processes(args, count)


@main.group()
def queues() -> None:
    """Create, purge and inspect the main, cancels and acks queues."""


@queues.command()
@settings_options
def create(**overrides: Any) -> None:
    """Create the three queues (idempotent)."""
    for name, url in admin(SyncQueues.create_all, overrides).items():
        click.echo(f"{name}\t{url}")


@queues.command()
@settings_options
def purge(**overrides: Any) -> None:
    """Delete every message in the three queues."""
    admin(SyncQueues.purge_all, overrides)
    click.echo("purged")


@queues.command()
@settings_options
def status(**overrides: Any) -> None:
    """Print visible and in-flight message counts per queue as JSON."""
    click.echo(json.dumps(admin(SyncQueues.depths, overrides), indent=2))


@main.command()
@click.option("--port", default=3000, show_default=True, help="Port of the Dagster UI.")
@click.option("--workers", default=1, show_default=True, help="Worker processes to start.")
def dev(port: int, workers: int) -> None:
    """The demo: embedded SQS, queues, workers and `dagster dev` on ./workspace.yaml."""
    from dagster_taskiq_cancel.dev import run_dev

    sys.exit(run_dev(port, workers))
