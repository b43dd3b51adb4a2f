"""``dagster-taskiq-cancel dev``: the demo stack, every process started here and stopped by pid.

Embedded SQS (moto on 127.0.0.1) unless an endpoint or real AWS is configured, the queues, worker
processes, and ``dagster dev`` on the workspace in the current folder. The demo's Dagster home is
``./dagster_home``, and its ``dagster.yaml`` there is the demo's one config file: no copy of it
elsewhere, and no ``dagster.yaml`` in the current folder for ``dagster dev`` to warn about.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Collection, Iterator, Mapping, MutableMapping
from pathlib import Path

from dagster._core.errors import DagsterInvalidConfigError, DagsterInvariantViolationError

from dagster_taskiq_cancel.local_sqs import LOCAL_CREDENTIALS, MotoServer, free_port, port_is_free
from dagster_taskiq_cancel.queues import SyncQueues
from dagster_taskiq_cancel.settings import (
    LAUNCHER_CONFIG,
    TaskiqCancelSettings,
    build_settings,
    resolve_settings,
    settings_from_env,
)

USE_AWS = "DAGSTER_TASKIQ_USE_AWS"
ENDPOINT_VAR = TaskiqCancelSettings.env_var("endpoint_url")
BOOLEANS = {"": False, "0": False, "false": False, "1": True, "true": True}
HOME_DIR = "dagster_home"
# In the demo's home while it runs: the settings a CLI command needs to reach its SQS server and
# its worker's health endpoint, which `dev` chose at start (free ports).
RUNNING_FILE = "running-demo.json"
# What `dev` imports or runs besides the package: the `dev` extra.
DEV_MODULES = ("dagster_webserver", "dagster_graphql", "moto", "flask", "flask_cors")


# Dagster's warning at every `dagster dev` that `dg dev` supersedes it: `dg` needs a dg project.
SUPERSEDED = "ignore:Function `dev_command` is superseded"
# The demo's second worker pool: example_project's gpu-tagged asset runs on its worker alone.
DEMO_POOL = "gpu"


def command(proc: subprocess.Popen[bytes]) -> str:
    """The module and subcommand a child runs (``dagster dev``), for a message."""
    args = [str(arg) for arg in proc.args]  # type: ignore[union-attr]
    start = args.index("-m") + 1
    return " ".join(args[start : start + 2])


class DevError(RuntimeError):
    """The demo cannot start; the message says why and what to do."""


def missing_extra() -> None:
    """Refuse to start without the packages of the `dev` extra, naming the install command."""
    missing = [name for name in DEV_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise DevError(
            f"the demo needs the dev extra ({', '.join(missing)} not installed): "
            "pip install 'dagster-taskiq-cancel[dev]'"
        )


def instance_problem(exc: DagsterInvalidConfigError | DagsterInvariantViolationError) -> str:
    """A dagster.yaml Dagster cannot use, in one line: Dagster's first line and its reasons."""
    if isinstance(exc, DagsterInvalidConfigError):
        # Dagster's first line may end in the whole schema's repr: "… configuration for {…}."
        first = exc.message.splitlines()[0].split(" for {", 1)[0].rstrip(".")
        return f"{first}. {'; '.join(exc.error_messages)}"
    return str(exc).splitlines()[0]


def running_demo_settings(home: Path) -> dict[str, str]:
    """The ``DAGSTER_TASKIQ_*`` values of the demo running in ``home``; none if none runs."""
    try:
        found = json.loads((home / RUNNING_FILE).read_text())
        os.kill(found["pid"], 0)  # a demo killed by SIGKILL leaves its file behind
        return {str(k): str(v) for k, v in found["environment"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def join_running_demo(
    environ: MutableMapping[str, str], cwd: Path, skip: Collection[str] = ()
) -> str | None:
    """Point a CLI command at the demo running in ``DAGSTER_HOME`` (else in ``./dagster_home``).

    Only what is not set already: its endpoint and worker health port (but no variable named in
    ``skip``), and ``DAGSTER_HOME`` when unset, in which case the returned note says so.
    """
    note = None
    home = environ.get("DAGSTER_HOME")
    if not home:
        found = running_demo_settings(cwd / HOME_DIR)
        if not found:
            return None
        home = environ["DAGSTER_HOME"] = str(cwd / HOME_DIR)
        note = f"DAGSTER_HOME is not set: using the running demo's, {home}"
    for name, value in running_demo_settings(Path(home)).items():
        if name not in skip and not environ.get(name):
            environ[name] = value
    return note


def use_aws(env: Mapping[str, str]) -> bool:
    """Whether ``DAGSTER_TASKIQ_USE_AWS`` asks for real SQS; only true/false (or 1/0) are read,
    so that ``0`` or a typo never sends the demo to an AWS account."""
    value = env.get(USE_AWS, "")
    try:
        return BOOLEANS[value.strip().lower()]
    except KeyError:
        raise DevError(f"{USE_AWS}={value!r}: set it to true or false (or 1 or 0)") from None


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, read from /proc (children before grandchildren)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, frontier = [], [pid]
    while frontier:
        children = [c for p in frontier for c in parents.get(p, [])]
        found.extend(children)
        frontier = children
    return found


def stop_tree(proc: subprocess.Popen[bytes], signum: int, timeout: float) -> None:
    """Signal ``proc``, wait for it and its descendants, SIGKILL survivors pid by pid."""
    tree = descendants(proc.pid)
    if proc.poll() is None:
        proc.send_signal(signum)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (
        proc.poll() is None or any(Path(f"/proc/{pid}").exists() for pid in tree)
    ):
        time.sleep(0.1)
    for pid in [proc.pid, *tree]:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            continue
    proc.wait()


def checked_settings(home: Path, env: Mapping[str, str]) -> TaskiqCancelSettings:
    """Every setting of the demo, checked before anything starts, as its processes will resolve
    them in ``env``; creates the sqlite databases once, before several processes race to.

    Dagster reads the instance's parts lazily: each is read here, so that a bad value is one
    line now rather than tracebacks from the daemon and a worker that exits after the banner.
    """
    with _environ(env):
        return _checked_settings(home, env)


@contextlib.contextmanager
def _environ(env: Mapping[str, str]) -> Iterator[None]:
    """This process's environment is ``env`` for a while: Dagster builds the launcher (and its
    settings) from ``os.environ``, and the check must see what the demo's processes will."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _checked_settings(home: Path, env: Mapping[str, str]) -> TaskiqCancelSettings:
    from dagster import DagsterInstance

    try:
        instance = DagsterInstance.from_config(str(home))
    except (DagsterInvalidConfigError, DagsterInvariantViolationError) as exc:
        raise DevError(f"{home / 'dagster.yaml'}: {instance_problem(exc)}") from None
    try:
        resolve_settings(instance)  # the launcher's config, as the demo's processes will see it
        instance.run_coordinator  # noqa: B018
        instance.get_runs(limit=1)
        instance.schedule_storage  # noqa: B018
        instance.event_log_storage  # noqa: B018
        launcher = instance.run_launcher
        ours = isinstance(getattr(launcher, "settings", None), TaskiqCancelSettings)
        given = launcher.inst_data.config_dict if ours and launcher.inst_data else {}
        return settings_from_env(given, environ=env, where=LAUNCHER_CONFIG)
    except (DagsterInvalidConfigError, DagsterInvariantViolationError) as exc:
        raise DevError(f"{home / 'dagster.yaml'}: {instance_problem(exc)}") from None
    finally:
        instance.dispose()


def _default_signals() -> None:
    """Runs in the child: `dagster dev` must see SIGINT even when we were started in background."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DevError(f"{' '.join(map(str, proc.args))} exited with {proc.returncode}")  # type: ignore[arg-type]
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    raise DevError(f"{url} did not answer in {timeout:.0f}s")


class DevStack:
    """The demo's processes; ``start`` brings them up, ``stop`` ends each by pid.

    Every child runs in a session of its own, so a terminal's Ctrl-C (SIGINT to the whole
    foreground process group) reaches only the ``dev`` process, which then stops the children in
    reverse order of start: `dagster dev` (whose daemon still talks to SQS), the workers, moto.
    """

    def __init__(
        self,
        root: Path,
        ui_port: int,
        workers: int,
        env: Mapping[str, str],
        home: Path | None = None,
        log_level: str = "info",
    ) -> None:
        self.root = root
        self.log_level = log_level
        self.ui_port = ui_port
        self.workers = workers
        self.env = dict(env)
        self.home = home or root / HOME_DIR
        self.moto: MotoServer | None = None
        self.settings: TaskiqCancelSettings | None = None  # once checked, as the workers see them
        self.processes: list[subprocess.Popen[bytes]] = []

    @property
    def ui_url(self) -> str:
        return f"http://127.0.0.1:{self.ui_port}"

    @property
    def config(self) -> Path:
        """The demo's one config file (copied into ``home`` when that is another folder)."""
        return self.root / HOME_DIR / "dagster.yaml"

    def start(self) -> None:
        missing_extra()
        aws = use_aws(self.env)
        if not (self.root / "workspace.yaml").exists():
            raise DevError(f"no workspace.yaml in {self.root}: run this from the repository root")
        if not self.config.exists():
            raise DevError(f"no {HOME_DIR}/dagster.yaml in {self.root}: run this from the root")
        if not port_is_free(self.ui_port):
            raise DevError(f"port {self.ui_port} is taken: pass --port with a free one")
        if self.home != self.config.parent:  # a private home: the tests' and benchmarks'
            self.home.mkdir(parents=True, exist_ok=True)
            shutil.copy(self.config, self.home / "dagster.yaml")
        # The SQS server the demo embeds unless dagster.yaml or the environment names one: its
        # endpoint is known (so checked: no signing key needed on this machine) before it starts.
        embedded = None if aws else MotoServer()
        endpoint = {ENDPOINT_VAR: embedded.endpoint_url} if embedded else {}
        checked = checked_settings(self.home, {**endpoint, **self.env})
        self.env["DAGSTER_HOME"] = str(self.home)
        chosen: dict[str, str] = {}  # what the demo picks, given to its processes as variables
        if embedded is not None and checked.endpoint_url == embedded.endpoint_url:
            self.moto = embedded.start()
            self.env.update({k: self.env.get(k, v) for k, v in LOCAL_CREDENTIALS.items()})
            chosen["endpoint_url"] = self.moto.endpoint_url
        if checked.metrics_port is None:  # so that `health` finds the demo's worker
            chosen["metrics_port"] = str(free_port())
        self.env.update({TaskiqCancelSettings.env_var(k): v for k, v in chosen.items()})
        settings = build_settings({**checked.model_dump(), **chosen})
        SyncQueues(settings.model_copy(update={"serve_queues": DEMO_POOL})).create_all()
        if self.workers:
            self.processes.append(self.start_workers(self.workers))
            self.processes.append(self.start_workers(1, DEMO_POOL))
        args = ["-m", "dagster", "dev", "-h", "127.0.0.1", "-p", str(self.ui_port)]
        dagster = subprocess.Popen(
            [sys.executable, "-W", SUPERSEDED, *args, "--log-level", self.log_level],
            env=self.env,
            cwd=self.root,
            preexec_fn=_default_signals,
            start_new_session=True,
        )
        self.processes.append(dagster)
        wait_http(f"{self.ui_url}/server_info", dagster, timeout=180)
        self.settings = settings
        self.running_file.write_text(
            json.dumps({"pid": os.getpid(), "environment": self.cli_settings(settings)})
        )

    def banner(self) -> str:
        endpoint = self.settings.endpoint_url if self.settings else None
        return (
            f"\nDagster UI: {self.ui_url}\n"
            f"Config: {self.config}\n"
            f"SQS: {endpoint or 'AWS'}, {self.workers} worker process(es) on the main queue "
            f"and 1 on the {DEMO_POOL} pool's; "
            "`dagster-taskiq-cancel` commands run in this folder reach this demo.\n"
            "Press Ctrl-C to stop everything.\n"
        )

    @property
    def running_file(self) -> Path:
        return self.home / RUNNING_FILE

    @staticmethod
    def cli_settings(settings: TaskiqCancelSettings) -> dict[str, str]:
        """What a CLI command needs to reach this demo, as ``DAGSTER_TASKIQ_*`` values."""
        chosen = {"endpoint_url": settings.endpoint_url, "metrics_port": settings.metrics_port}
        return {
            TaskiqCancelSettings.env_var(name): str(value)
            for name, value in chosen.items()
            if value is not None
        }

    def start_workers(self, count: int, pool: str | None = None) -> subprocess.Popen[bytes]:
        """Worker processes sharing the stack's instance and queues; ``pool``'s alone, with a
        health port of their own (``health`` asks the main queue's)."""
        args = ["worker", "--workers", str(count), *(["--queue", pool] if pool else [])]
        env = dict(self.env)
        if pool:
            env[TaskiqCancelSettings.env_var("metrics_port")] = str(free_port())
        return subprocess.Popen(
            [sys.executable, "-m", "dagster_taskiq_cancel", *args],
            env=env,
            cwd=self.root,
            start_new_session=True,  # only `dev` gets a terminal's Ctrl-C; it stops us in order
        )

    def stop(self) -> None:
        if self.settings is not None:  # this stack wrote the file
            self.running_file.unlink(missing_ok=True)
        for proc in reversed(self.processes):
            stop_tree(proc, signal.SIGINT, timeout=20)
        if self.moto is not None:
            self.moto.stop()

    def wait(self) -> int:
        """Block until Ctrl-C / SIGTERM or until one of the processes exits on its own."""
        stop = {"signal": 0}

        def on_signal(signum: int, _frame: object) -> None:
            stop["signal"] = signum

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        while not stop["signal"]:
            for proc in self.processes:
                if proc.poll() is not None:
                    print(f"{command(proc)} exited with {proc.returncode}; stopping", flush=True)
                    return 1
            time.sleep(0.2)
        return 0


def run_dev(ui_port: int, workers: int, log_level: str = "info") -> int:
    """Start the demo, wait for Ctrl-C, stop it; a DevError or SettingsError propagates after
    whatever started is stopped, for the CLI to print as one line."""
    stack = DevStack(Path.cwd(), ui_port, workers, os.environ, log_level=log_level)
    try:
        stack.start()
        print(stack.banner(), flush=True)
        return stack.wait()
    except KeyboardInterrupt:  # Ctrl-C while starting: stop what started, quietly
        return 130
    finally:
        stack.stop()
