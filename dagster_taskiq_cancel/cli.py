"""``dagster-taskiq-cancel``: worker and queue administration.

Every settings field a command uses is also its option (``--poll-interval-seconds``). Options
win, then the ``TaskiqRunLauncher`` config of the ``DAGSTER_HOME`` instance, then
``DAGSTER_TASKIQ_*``, then the defaults: the one order of every entry point
(``settings.resolve_settings``). Beside a running demo (``dev``), what it chose at start fills in
what none of these sets (``dev.join_running_demo``).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import sys
import time
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from dagster import DagsterInstance, DagsterRunStatus
from dagster._core.errors import (
    DagsterHomeNotSetError,
    DagsterInvalidConfigError,
    DagsterInvariantViolationError,
)

from dagster_taskiq_cancel import __version__
from dagster_taskiq_cancel.bulk import (
    DEFAULT_STATUSES,
    BulkCancelResult,
    EmptyFilterError,
    cancel_runs,
)
from dagster_taskiq_cancel.cancel import environment_user
from dagster_taskiq_cancel.dev import DevError, instance_problem, join_running_demo
from dagster_taskiq_cancel.queues import SqsError, SyncQueues, backlog_figures
from dagster_taskiq_cancel.routing import served_pools
from dagster_taskiq_cancel.settings import (
    SettingsError,
    TaskiqCancelSettings,
    build_settings,
    current_settings,
    env_values,
    resolve_settings,
)

logger = logging.getLogger(__name__)

CLICK_TYPES: dict[Any, click.ParamType] = {float: click.FLOAT, int: click.INT}
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
SCHEMA_RACE_TRIES = 5
_DUPLICATE_PGCODES = frozenset({"23505", "42P07", "42710"})  # unique, table, object
# The settings each command reads; the worker reads them all.
QUEUE_SETTINGS = ("queue_name", "region_name", "endpoint_url", "priority_lanes")
HEALTH_SETTINGS = ("metrics_port", "metrics_host")
# Libraries' INFO lines a worker would print at every task or connection: not the user's news.
QUIET_LOGGERS = ("alembic", "botocore", "aiobotocore", "aioboto3", "boto3")
LINUX_ONLY = (
    "the worker runs on Linux only: it stops a task's processes with Linux's prctl "
    "(parent-death signal, subreaper); run it in a Linux container or host, not on {platform}"
)
NO_HOME = (
    "DAGSTER_HOME is not set: set it to the folder with the dagster.yaml your webserver and "
    "daemon use (the workers must share their run storage), e.g. DAGSTER_HOME=/srv/dagster"
)
CANCEL_NO_HOME = (
    "DAGSTER_HOME is not set: `cancel` needs it pointing at the instance your runs live in (the "
    "folder with the dagster.yaml your webserver and daemon use), e.g. DAGSTER_HOME=/srv/dagster"
)


def settings_options(*names: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add one option per settings field named (all when none are); the command receives them
    as ``**overrides``."""
    fields = TaskiqCancelSettings.model_fields
    chosen = names or tuple(fields)

    def add(command: Callable[..., Any]) -> Callable[..., Any]:
        for name in reversed(chosen):
            command = click.option(
                f"--{name.replace('_', '-')}",
                name,
                type=_click_type(fields[name].annotation),
                default=None,
                help=f"{fields[name].description} [env {TaskiqCancelSettings.env_var(name)}]",
            )(command)
        return command

    return add


def _click_type(annotation: Any) -> click.ParamType:
    """The option type of a field; an optional field (``int | None``) as its type."""
    types = [t for t in typing.get_args(annotation) if t is not type(None)] or [annotation]
    return CLICK_TYPES.get(types[0], click.STRING) if len(types) == 1 else click.STRING


def load_instance(no_home: str = NO_HOME) -> DagsterInstance:
    """The ``DAGSTER_HOME`` instance, or a one-line error (``no_home`` when unset)."""
    try:
        return DagsterInstance.get()
    except DagsterHomeNotSetError:
        raise click.ClickException(no_home) from None
    except (DagsterInvariantViolationError, DagsterInvalidConfigError) as exc:
        raise unusable_home(exc) from None


def load_worker_instance(tries: int = SCHEMA_RACE_TRIES) -> DagsterInstance:
    """``load_instance``, tried again when it lost the race to create Dagster's schema.

    Components started together against an empty Postgres database all create the schema;
    the losers fail on a duplicate table, type or row (``instance_info``), and their next try
    finds the schema made.
    """
    for attempt in range(1, tries + 1):
        try:
            return load_instance()
        except Exception as exc:
            if attempt == tries or not lost_schema_race(exc):
                raise
            logger.warning("Another process was creating Dagster's schema (%s); trying again", exc)
            time.sleep(0.2 * attempt)
    raise AssertionError("unreachable")


def lost_schema_race(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or an error it was raised from) is a duplicate made by a concurrent
    CREATE: Postgres's unique violation, duplicate table or duplicate object."""
    while exc is not None:
        if getattr(getattr(exc, "orig", None), "pgcode", None) in _DUPLICATE_PGCODES:
            return True
        if type(exc).__name__ == "DagsterPostgresException":  # Dagster's own retries ran out
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def unusable_home(
    exc: DagsterInvalidConfigError | DagsterInvariantViolationError,
) -> click.ClickException:
    """DAGSTER_HOME is set but its dagster.yaml cannot be read: Dagster's first lines, on one."""
    return click.ClickException(instance_problem(exc))


def require_linux() -> None:
    if not sys.platform.startswith("linux"):
        raise click.ClickException(LINUX_ONLY.format(platform=sys.platform))


def admin(fn: Callable[[SyncQueues], Any], overrides: dict[str, Any]) -> Any:
    try:
        settings = current_settings(overrides)
        queues = SyncQueues(settings)
        queues.names.task_queues(served_pools(settings), False)  # a bad pool name: said now
        return fn(queues)
    except (SettingsError, SqsError) as exc:
        raise click.ClickException(str(exc)) from None
    except (DagsterInvariantViolationError, DagsterInvalidConfigError) as exc:
        raise unusable_home(exc) from None  # DAGSTER_HOME set but not usable


@click.group()
@click.version_option(__version__, prog_name="dagster-taskiq-cancel")
@click.pass_context
def main(ctx: click.Context) -> None:
    """Dagster work on taskiq workers over SQS that stops when you click Terminate.

    While the demo runs (`dev`), every other command reaches it with no options: from the
    folder it runs in, or with DAGSTER_HOME set to its dagster_home, a command takes the demo's
    SQS endpoint and worker health port unless its options, dagster.yaml or DAGSTER_TASKIQ_*
    name others.
    """
    if ctx.invoked_subcommand != "dev" and not ctx.resilient_parsing:
        # A worker added by hand serves its own health port, not the demo worker's.
        skip = (
            {TaskiqCancelSettings.env_var("metrics_port")}
            if ctx.invoked_subcommand == "worker"
            else set()
        )
        note = join_running_demo(os.environ, Path.cwd(), skip)
        if note:
            click.echo(note, err=True)


def queue_option(what: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--queue POOL``, repeatable: the command's pools, as the ``serve_queues`` setting."""
    return click.option(
        "--queue",
        "pools",
        multiple=True,
        metavar="POOL",
        help=f"A pool {what} (repeatable): `default` is the main queue, `gpu` the queue "
        "`{queue_name}-gpu`. Without it: serve_queues, else the main queue alone.",
    )


def with_pools(overrides: dict[str, Any], pools: tuple[str, ...]) -> dict[str, Any]:
    """The overrides with ``--queue`` values as ``serve_queues`` (which they then override)."""
    return {**overrides, "serve_queues": ",".join(pools)} if pools else overrides


@main.command()
@click.option("--workers", default=1, show_default=True, help="Worker processes to start.")
@queue_option("to take work from, high lanes first")
@settings_options()
def worker(workers: int, pools: tuple[str, ...], **overrides: Any) -> None:
    """Run worker processes: execute runs and steps, stop them when their run is cancelled.

    Linux only. Its settings come from the TaskiqRunLauncher config in DAGSTER_HOME's
    dagster.yaml, then DAGSTER_TASKIQ_*; these options override both.
    """
    require_linux()
    overrides = with_pools(overrides, pools)
    # Before the instance: Dagster's Postgres storage logs through the root logger while it
    # creates its schema, which would otherwise leave it at WARNING, without our format.
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, force=True)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    instance = load_worker_instance()
    settings = worker_settings(instance, overrides)  # checked here, before any child starts
    if workers > 1:
        instance.dispose()
        args = ["worker", "--workers", "1"]
        for name, value in overrides.items():
            if value is not None:
                args += [f"--{name.replace('_', '-')}", str(value)]
        sys.exit(_run_processes(args, workers, settings))
    from dagster_taskiq_cancel.worker.health import EndpointError
    from dagster_taskiq_cancel.worker.process import serve

    try:
        asyncio.run(serve(settings, instance))
    except (SqsError, EndpointError) as exc:
        raise click.ClickException(str(exc)) from None


def worker_settings(instance: Any, overrides: dict[str, Any]) -> TaskiqCancelSettings:
    """The instance's launcher settings when it uses ours (one config for both), else the env."""
    try:
        return resolve_settings(instance, overrides)
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None


def _run_processes(args: list[str], count: int, settings: TaskiqCancelSettings) -> int:
    from dagster_taskiq_cancel.worker.health import EndpointError
    from dagster_taskiq_cancel.worker.process import run_processes

    try:
        return run_processes(args, count, settings)
    except EndpointError as exc:
        raise click.ClickException(str(exc)) from None


@main.command()
@click.option("--live", is_flag=True, help="Ask /healthz (loops alive) instead of /readyz.")
@click.option("--timeout", default=5.0, show_default=True, help="Seconds to wait for an answer.")
@settings_options(*HEALTH_SETTINGS)
def health(live: bool, timeout: float, **overrides: Any) -> None:
    """Probe this host's worker: exit 0 if ready (or, with --live, alive), else 1.

    For container health checks without HTTP tools (ECS). It asks the worker's own endpoint, so
    it reads metrics_port and metrics_host from the options and DAGSTER_TASKIQ_* only (or the
    running demo's): it must answer even when the run storage in dagster.yaml does not.
    """
    from dagster_taskiq_cancel.worker.health import probe

    try:
        # No key check: the probe sends nothing on a queue, it asks the worker over HTTP.
        settings = build_settings(env_values(overrides))
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None
    healthy, answer = probe(settings, live, timeout)
    click.echo(answer)
    sys.exit(0 if healthy else 1)


@main.group()
def queues() -> None:
    """Create, purge and inspect the main, cancels and acks queues."""


@queues.command()
@queue_option("whose queue to create")
@settings_options(*QUEUE_SETTINGS)
def create(pools: tuple[str, ...], **overrides: Any) -> None:
    """Create the main, cancels and acks queues, and each pool's (idempotent)."""
    for name, url in admin(SyncQueues.create_all, with_pools(overrides, pools)).items():
        click.echo(f"{name}\t{url}")


@queues.command()
@queue_option("whose queue to purge")
@settings_options(*QUEUE_SETTINGS)
def purge(pools: tuple[str, ...], **overrides: Any) -> None:
    """Delete every message in the main, cancels and acks queues, and each pool's."""
    admin(SyncQueues.purge_all, with_pools(overrides, pools))
    click.echo("purged")


@queues.command()
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Worker processes per replica (`worker --workers`): slots per replica = this times "
    "--concurrency.",
)
@queue_option("whose backlog to report")
@settings_options(*QUEUE_SETTINGS, "concurrency")
def status(workers: int, pools: tuple[str, ...], **overrides: Any) -> None:
    """Print message counts per queue as JSON, and each task queue's backlog per worker slot
    (one autoscaler per pool)."""
    depths, queues = admin(lambda q: (q.depths(), q), with_pools(overrides, pools))
    for name in queues.task_queue_names:
        depths[name].update(backlog_figures(depths[name], workers * queues.settings.concurrency))
    if not queues.settings.keyring:
        click.echo(
            "Warning: no signing key is set (DAGSTER_TASKIQ_SIGNING_KEYS): anyone who can send "
            "to the queues can forge cancel requests and acks, and an ack can rewrite a "
            "CANCELED run's status. Set one on every component in production.",
            err=True,
        )
    click.echo(json.dumps(depths, indent=2))


@main.command()
@click.option("--port", default=3000, show_default=True, help="Port of the Dagster UI.")
@click.option("--workers", default=1, show_default=True, help="Worker processes to start.")
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
    help="Log level of `dagster dev`; `warning` hides its daemon's lines for every sensor tick.",
)
def dev(port: int, workers: int, log_level: str) -> None:
    """The demo: local SQS, queues, workers and `dagster dev` on ./workspace.yaml.

    Its config is ./dagster_home/dagster.yaml (its Dagster home), checked before anything
    starts. Needs the dev extra: pip install 'dagster-taskiq-cancel[dev]'.
    """
    from dagster_taskiq_cancel.dev import run_dev

    require_linux()
    try:
        code = run_dev(port, workers, log_level)
    except (DevError, SettingsError, SqsError) as exc:
        raise click.ClickException(str(exc)) from None
    sys.exit(code)


STATUS_CHOICES = [s.value for s in (*DEFAULT_STATUSES, DagsterRunStatus.CANCELING)]


def _parse_tags(
    _ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]
) -> dict[str, str]:
    tags = {}
    for value in values:
        key, sep, tag_value = value.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{value!r} is not KEY=VALUE")
        tags[key] = tag_value
    return tags


def _echo_result(result: BulkCancelResult) -> None:
    """Counts per status before the cancel and per action, then one line per run."""
    by_status = ", ".join(f"{status} {n}" for status, n in sorted(result.by_status.items()))
    by_action = ", ".join(f"{action} {n}" for action, n in sorted(result.by_action.items()))
    click.echo(f"runs by status: {by_status or 'none matched'}")
    click.echo(f"actions: {by_action or 'none'}")
    if result.hints_unsent:
        click.echo(
            f"{result.hints_unsent} cancel messages not sent: workers stop those at their next poll"
        )
    click.echo(f"{'RUN ID':36}  {'STATUS BEFORE':13}  {'ACTION':12}  ERROR")
    for o in result.outcomes:
        before = o.status_before.value if o.status_before else "missing"
        click.echo(f"{o.run_id:36}  {before:13}  {o.action:12}  {o.error or ''}")


@main.command()
@click.option("--run-id", "run_ids", multiple=True, help="A run to cancel (repeatable).")
@click.option("--tag", "tags", multiple=True, callback=_parse_tags, help="KEY=VALUE (repeatable).")
@click.option("--job", "job_name", default=None, help="Only runs of this job.")
@click.option(
    "--status",
    "statuses",
    multiple=True,
    type=click.Choice(STATUS_CHOICES, case_sensitive=False),
    metavar=f"[{'|'.join(STATUS_CHOICES)}]",
    default=[s.value for s in DEFAULT_STATUSES],
    show_default=True,
    help="Only runs in this status (repeatable; any case).",
)
@click.option("--reason", default="", help="Why, for the audit trail in each run's event log.")
@click.option(
    "--requested-by",
    default=environment_user,
    show_default="the current user",
    help="Who asks, for the audit trail.",
)
@click.option("--dry-run", is_flag=True, help="Only print what would be cancelled.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def cancel(
    run_ids: tuple[str, ...],
    tags: dict[str, str],
    job_name: str | None,
    statuses: tuple[str, ...],
    reason: str,
    requested_by: str,
    dry_run: bool,
    yes: bool,
) -> None:
    """Cancel many runs at once, selected by run id, tag, job and status."""
    instance = load_instance(CANCEL_NO_HOME)
    select = functools.partial(
        cancel_runs,
        instance,
        run_ids=run_ids,
        tags=tags,
        job_name=job_name,
        statuses=[DagsterRunStatus(s.upper()) for s in statuses],
        reason=reason,
        requested_by=requested_by,
    )
    try:
        if dry_run or not yes:
            preview = select(dry_run=True)
            _echo_result(preview)
            if dry_run or not preview.by_action["would_cancel"]:
                return
            click.confirm(f"Cancel {preview.by_action['would_cancel']} runs?", abort=True)
        result = select()
    except (EmptyFilterError, SettingsError, SqsError) as exc:
        raise click.ClickException(str(exc)) from None
    _echo_result(result)
    if not result.ok:
        sys.exit(1)
