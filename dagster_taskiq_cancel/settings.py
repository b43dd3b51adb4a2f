"""The one settings class: every option of the launcher, the resource, the executor and the worker.

Each field can also come from the environment as ``DAGSTER_TASKIQ_<FIELD NAME IN CAPITALS>``
(``settings_from_env``), so that one environment serves the webserver, the daemon, the code
location and the workers alike. Every entry point resolves them in one order: fields given
explicitly, then the instance's ``TaskiqRunLauncher`` config, then the environment, then the
defaults (``resolve_settings`` with an instance, ``current_settings`` without one).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import dagster as dg
from dagster._config.errors import (
    FieldNotDefinedErrorData,
    FieldsNotDefinedErrorData,
    RuntimeMismatchErrorData,
)
from dagster._core.errors import DagsterInvalidConfigError
from pydantic import ConfigDict, Field, ValidationError, field_validator

if TYPE_CHECKING:
    from dagster import DagsterInstance

ENV_PREFIX = "DAGSTER_TASKIQ_"
LAUNCHER_CONFIG = "dagster.yaml under run_launcher: config:"
CONFIG = "the config"
# What Dagster's config schema expected, in the words of a one-line error.
EXPECTED = {
    "Float": "should be a number",
    "Int": "should be a whole number",
    "String": "should be text",
}
LARGE_PAYLOAD_DEFAULT = 256 * 1024
LARGE_PAYLOAD_MAX = 1024 * 1024  # SQS's largest message
# Set by a worker in the environment of a child it gives no signing key (it sends no tasks).
KEY_WITHHELD_ENV = f"{ENV_PREFIX}KEY_WITHHELD"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


class TaskiqCancelSettings(dg.Config):
    """Where the queues are and how quickly cancellation acts."""

    # An infinite or NaN time is no deadline: a stop would never reach SIGKILL.
    model_config = ConfigDict(allow_inf_nan=False)

    queue_name: str = Field(
        default="dagster-taskiq",
        description=(
            "Main queue name or full SQS queue URL. The cancel and ack queues are derived from it: "
            "`{name}-cancels`, `{name}-cancel-acks` (`.fifo` kept at the end for FIFO queues)."
        ),
    )
    location_queues: str = Field(
        default="",
        description=(
            "Default pool per code location, as `location=pool,location=pool`: a run with no "
            "`dagster-taskiq/queue` tag goes to its location's pool, else to the main queue."
        ),
    )
    serve_queues: str = Field(
        default="",
        description=(
            "Pools a worker serves, comma separated (`worker --queue`, repeatable); empty: the "
            "main queue (pool `default`). Pool `gpu` is the queue `{name}-gpu`."
        ),
    )
    priority_lanes: bool = Field(
        default=False,
        description=(
            "A high lane `{queue}-high` beside every task queue: work whose `dagster/priority` "
            "tag is above 0 goes there and workers take it first. Each lane is one more long "
            "poll per idle worker (3 requests a minute); set it on every component alike."
        ),
    )
    region_name: str = Field(default="us-east-1", description="AWS region of the queues.")
    endpoint_url: str | None = Field(
        default=None,
        description=(
            "SQS endpoint, for a local server such as moto; when unset, AWS's SQS in region_name."
        ),
    )
    poll_interval_seconds: float = Field(
        default=5.0,
        gt=0,
        description=(
            "How often a worker asks the run storage about every run it holds, when nothing "
            "woke it: a cancel hint makes it ask at once, this poll is the backstop."
        ),
    )
    notice_seconds: float = Field(
        default=0.0,
        ge=0,
        description=(
            "Notice before the interrupt: op code sees it through cancellation_requested() "
            "and may stop by itself. Also per run (tag dagster-taskiq/notice_seconds)."
        ),
    )
    grace_seconds: float = Field(
        default=10.0,
        ge=0,
        description="Time from SIGTERM (Dagster's interrupt) to SIGKILL of the task's processes.",
    )
    concurrency: int = Field(
        default=4, ge=1, description="Tasks one worker process runs at once (its slots)."
    )
    prefetch: int = Field(
        default=0,
        ge=0,
        le=10,
        description="Messages a worker may hold beyond its free slots (no hoarding).",
    )
    wait_time_seconds: int = Field(
        default=20, ge=1, le=20, description="SQS long-poll wait on every queue."
    )
    visibility_timeout_seconds: int = Field(
        default=60,
        ge=1,
        le=43200,
        description="How long a received, not yet started task stays invisible to other workers.",
    )
    drain_seconds: float = Field(
        default=30.0,
        ge=0,
        description=(
            "On SIGTERM a worker stops receiving and lets running work finish this long; then it "
            "stops it, leaving each run to run monitoring's resume if that is on, else failing it."
        ),
    )
    heartbeat_timeout_seconds: float = Field(
        default=60.0,
        gt=0,
        description=(
            "Run monitoring fails a run whose worker has not written a heartbeat for this long "
            "(workers beat every sixth of it)."
        ),
    )
    step_claim_timeout_seconds: float = Field(
        default=600.0,
        gt=0,
        description=(
            "taskiq_executor fails a step whose task no worker has claimed this long after it was "
            "sent (lost message, no worker on the queue): size it above the longest queue wait."
        ),
    )
    cancel_timeout_seconds: float = Field(
        default=120.0,
        gt=0,
        description=(
            "A CANCELING run with no worker acknowledgement is marked CANCELED this long after "
            "its notice and grace ran out, once no live worker (fresh heartbeat) holds it."
        ),
    )
    metrics_port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description=(
            "Port of the worker host's HTTP endpoint: /metrics (Prometheus), /healthz and "
            "/readyz; one per host (with --workers N the parent serves all N). Unset: no endpoint."
        ),
    )
    metrics_host: str = Field(
        default="127.0.0.1",
        description=(
            "Address the metrics endpoint listens on; 0.0.0.0 in a container, so that Prometheus "
            "and the orchestrator's probes reach it from outside."
        ),
    )

    large_payload_bucket: str | None = Field(
        default=None,
        description=(
            "S3 bucket for task bodies over large_payload_threshold_bytes (AWS SQS Extended "
            "Client format), and the only bucket workers read such bodies from."
        ),
    )
    large_payload_threshold_bytes: int = Field(
        default=LARGE_PAYLOAD_DEFAULT,
        ge=1,
        le=LARGE_PAYLOAD_MAX,
        description=(
            "Task bodies over this many bytes go to large_payload_bucket (1 to 1048576, SQS's "
            "limit; a few hundred bytes sends every task through S3)."
        ),
    )

    signing_keys: str | None = Field(
        default=None,
        repr=False,
        description=(
            "Shared keys for HMAC-SHA256 signatures on tasks, cancel requests and acks, comma "
            "separated: the first signs, any verifies (rotation). When set, unsigned, badly "
            "signed or stale messages are rejected. Give it in the environment only."
        ),
    )
    signing_key: str | None = Field(
        default=None,
        repr=False,
        description="One signing key: the same as signing_keys with one key (set one of them).",
    )
    allow_unsigned: bool = Field(
        default=False,
        description=(
            "Run with no signing key on an SQS endpoint that is not on this machine (AWS): "
            "anyone who can send to the queues can then start work and end cancelled runs."
        ),
    )
    signature_max_age_seconds: float = Field(
        default=300.0,
        gt=0,
        description=(
            "Signed cancel requests older than this are rejected as stale (acks never expire)."
        ),
    )

    @field_validator("location_queues")
    @classmethod
    def _location_pairs(cls, value: str) -> str:
        """Each item ``location=pool``: a typo fails at start-up, not as runs on the wrong pool."""
        for item in filter(str.strip, value.split(",")):
            location, _, pool = item.partition("=")
            if not location.strip() or not pool.strip():
                raise ValueError(f"{item.strip()!r} is not location=pool")
        return value

    @classmethod
    def env_var(cls, field_name: str) -> str:
        """The environment variable that sets ``field_name``."""
        return f"{ENV_PREFIX}{field_name.upper()}"

    @property
    def keyring(self) -> tuple[str, ...]:
        """The signing keys, the one that signs first; empty when messages are not signed.

        An empty value is no key: a worker gives its children the variables empty, so that a
        dagster.yaml that reads them (``{env: …}``) still loads there (``KEY_WITHHELD_ENV``).
        """
        if self.signing_keys:
            return tuple(key.strip() for key in self.signing_keys.split(","))
        return (self.signing_key,) if self.signing_key else ()


# Never in run config: run config is stored with the run and shown in the UI and over GraphQL.
SECRET_FIELDS = frozenset({"signing_key", "signing_keys"})
KEY_ENV_VARS = frozenset(TaskiqCancelSettings.env_var(name) for name in SECRET_FIELDS)


def config_fields(secrets: bool = True) -> dict[str, dg.Field]:
    """The settings as Dagster config fields, all optional with no default filled in.

    Used by the launcher's ``config_type()`` and (without ``secrets``) the executor's schema:
    what a user leaves out then falls back to the environment (and, for the executor, to the
    launcher's settings) instead of being pinned to the class default.
    """
    return {
        name: dg.Field(field.config_type, is_required=False, description=field.description)
        for name, field in TaskiqCancelSettings.to_fields_dict().items()
        if secrets or name not in SECRET_FIELDS
    }


class SettingsError(ValueError):
    """A setting is wrong; the message says which and what to change."""


def settings_from_env(
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    where: str = CONFIG,
) -> TaskiqCancelSettings:
    """Settings from ``DAGSTER_TASKIQ_*`` variables, then ``overrides`` (None values skipped),
    with their keys checked (``checked``).

    ``where`` names the place the overrides come from, for the error.
    """
    env = os.environ if environ is None else environ
    return checked(build_settings(env_values(overrides, env), where), where, env)


def env_values(
    overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The raw values of ``DAGSTER_TASKIQ_*`` variables, then ``overrides`` (None skipped)."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for name in TaskiqCancelSettings.model_fields:
        raw = env.get(TaskiqCancelSettings.env_var(name))
        if raw not in (None, ""):
            values[name] = raw
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return values


def build_settings(values: Mapping[str, Any], where: str = CONFIG) -> TaskiqCancelSettings:
    """Validate ``values`` into settings, turning pydantic's error into one that names the fix."""
    try:
        return TaskiqCancelSettings(**values)
    except ValidationError as exc:
        problems = [
            (".".join(str(p) for p in err["loc"]), err.get("input"), err["msg"])
            for err in exc.errors()
        ]
        raise SettingsError(describe(problems, where)) from None


def endpoint_for(settings: TaskiqCancelSettings) -> str | None:
    """The SQS endpoint: explicit, or taken from a queue URL given as ``queue_name``; None: AWS."""
    if settings.endpoint_url:
        return settings.endpoint_url
    if "://" in settings.queue_name:
        scheme, rest = settings.queue_name.split("://", 1)
        host = rest.split("/", 1)[0]
        if not host.startswith("sqs.") or not host.endswith("amazonaws.com"):
            return f"{scheme}://{host}"
    return None


def is_local(endpoint_url: str | None) -> bool:
    """Whether the SQS endpoint is on this machine (the demo's, the tests'); None is AWS."""
    host = urlsplit(endpoint_url).hostname if endpoint_url else None
    return host in LOOPBACK_HOSTS


def checked(
    settings: TaskiqCancelSettings, where: str, environ: Mapping[str, str] | None = None
) -> TaskiqCancelSettings:
    """``settings`` once their keys are usable: given in one form, none empty, and some key
    unless the endpoint is local, ``allow_unsigned`` says so, or a worker withheld the key from
    this process (``KEY_WITHHELD_ENV``: it sends nothing a worker must trust)."""
    env = os.environ if environ is None else environ
    keys_var = TaskiqCancelSettings.env_var("signing_keys")
    where_keys = f"in {where} or as {keys_var}"
    problem = None
    if settings.signing_keys and settings.signing_key:
        problem = (
            f"signing_key and signing_keys are both set: keep signing_keys alone ({where_keys})"
        )
    elif any(not key for key in settings.keyring):
        problem = (
            "signing_keys has an empty key: give the keys comma separated, the signing one first "
            f"({where_keys})"
        )
    elif not (
        settings.keyring
        or settings.allow_unsigned
        or is_local(endpoint_for(settings))
        or env.get(KEY_WITHHELD_ENV)
    ):
        problem = (
            f"no signing key for the SQS endpoint {endpoint_for(settings) or 'AWS'}: set "
            f"{keys_var} (else anyone who can send to the queues can start work and end "
            f"cancelled runs), or allow_unsigned: true in {where} to accept that"
        )
    if problem:
        raise SettingsError(f"Invalid dagster-taskiq-cancel settings: {problem}")
    return settings


def describe(problems: list[tuple[str, Any, str]], where: str) -> str:
    """The one line for every wrong setting: field, value given, what is wrong, where to fix it."""
    fields = list(TaskiqCancelSettings.model_fields)
    parts = []
    for field, value, reason in problems:
        name = field.split(".")[0]
        if name in fields:
            hint = f"set it in {where} or as {TaskiqCancelSettings.env_var(name)}"
        else:
            close = difflib.get_close_matches(name, fields, n=1)
            reason += f", did you mean {close[0]}?" if close else ""
            hint = f"fix it in {where}"
        parts.append(f"{field}={value!r}: {reason} ({hint})")
    return f"Invalid dagster-taskiq-cancel settings: {'; '.join(parts)}"


def launcher_config_problems(exc: DagsterInvalidConfigError) -> str:
    """Dagster's schema error on the launcher config (a long dump), said as ``describe`` does."""
    given = exc.config_value if isinstance(exc.config_value, Mapping) else {}
    problems = []
    for error in exc.errors:
        data = error.error_data
        if isinstance(data, FieldNotDefinedErrorData | FieldsNotDefinedErrorData):
            names = (
                [data.field_name]
                if isinstance(data, FieldNotDefinedErrorData)
                else data.field_names
            )
            problems += [(name, given.get(name), "not a setting") for name in names]
            continue
        if not error.stack.levels:  # the config as a whole, e.g. not a mapping
            problems.append(("run_launcher.config", exc.config_value, error.message))
            continue
        field = error.stack.levels[0]
        reason = error.message
        if isinstance(data, RuntimeMismatchErrorData):
            key = data.config_type_snap.key
            reason = EXPECTED.get(key, f"should be of type {key}")
        problems.append((field, given.get(field), reason))
    return describe(problems, LAUNCHER_CONFIG)


def resolve_settings(
    instance: DagsterInstance, overrides: Mapping[str, Any] | None = None
) -> TaskiqCancelSettings:
    """The settings of everything that has an instance: the executor and the worker.

    Starts from the instance's ``TaskiqRunLauncher`` settings, so that dagster.yaml configures
    launcher, executor and worker at once, or from the environment when the instance uses another
    launcher; then ``overrides`` (None values skipped) win.
    """
    try:
        launcher = instance.run_launcher
    except DagsterInvalidConfigError as exc:
        raise SettingsError(launcher_config_problems(exc)) from None
    # Any launcher that carries these settings (ours does): settings do not know the launcher.
    configured = getattr(launcher, "settings", None)
    if not isinstance(configured, TaskiqCancelSettings):
        return settings_from_env(overrides)
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    return checked(build_settings({**configured.model_dump(), **given}), CONFIG)


def current_settings(overrides: Mapping[str, Any] | None = None) -> TaskiqCancelSettings:
    """``resolve_settings`` for entry points with no instance at hand (``queues``, scripts).

    Reads the instance of ``DAGSTER_HOME`` when it is set, so that dagster.yaml configures the
    queue commands and the resource as it does the launcher; without it, the environment.
    """
    if not os.environ.get("DAGSTER_HOME"):
        return settings_from_env(overrides)
    from dagster import DagsterInstance

    instance = DagsterInstance.get()
    try:
        return resolve_settings(instance, overrides)
    finally:
        instance.dispose()
