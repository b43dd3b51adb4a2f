"""``dagster-taskiq-cancel dev``: the demo stack, every process started here and stopped by pid.

Embedded SQS (moto on 127.0.0.1) unless ``DAGSTER_TASKIQ_ENDPOINT_URL`` or real AWS settings are
given, the queues, worker processes, and ``dagster dev`` on the workspace in the current folder.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from dagster_taskiq_cancel.local_sqs import LOCAL_CREDENTIALS, MotoServer, port_is_free
from dagster_taskiq_cancel.queues import SqsError, SyncQueues
from dagster_taskiq_cancel.settings import SettingsError, TaskiqCancelSettings, settings_from_env

USE_AWS = "DAGSTER_TASKIQ_USE_AWS"
BOOLEANS = {"": False, "0": False, "false": False, "1": True, "true": True}


class DevError(RuntimeError):
    """The demo cannot start; the message says why and what to do."""


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


def _create_storage(home: Path) -> None:
    """Create the sqlite databases once, before several processes race to create them."""
    from dagster import DagsterInstance

    instance = DagsterInstance.from_config(str(home))
    try:
        for storage in (
            instance.run_storage,
            instance.event_log_storage,
            instance.schedule_storage,
        ):
            assert storage is not None
        instance.get_runs(limit=1)
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
        self.home = home or root / ".dagster_home"
        self.moto: MotoServer | None = None
        self.processes: list[subprocess.Popen[bytes]] = []

    @property
    def ui_url(self) -> str:
        return f"http://127.0.0.1:{self.ui_port}"

    def start(self) -> None:
        aws = use_aws(self.env)
        if not (self.root / "workspace.yaml").exists():
            raise DevError(f"no workspace.yaml in {self.root}: run this from the repository root")
        if not port_is_free(self.ui_port):
            raise DevError(f"port {self.ui_port} is taken: pass --port with a free one")
        self.home.mkdir(exist_ok=True)
        shutil.copy(self.root / "dagster.yaml", self.home / "dagster.yaml")
        _create_storage(self.home)
        self.env["DAGSTER_HOME"] = str(self.home)
        if not self.env.get(TaskiqCancelSettings.env_var("endpoint_url")) and not aws:
            self.moto = MotoServer().start()
            self.env.update({k: self.env.get(k, v) for k, v in LOCAL_CREDENTIALS.items()})
            self.env[TaskiqCancelSettings.env_var("endpoint_url")] = self.moto.endpoint_url
        settings = settings_from_env(environ=self.env)
        SyncQueues(settings).create_all()
        if self.workers:
            self.processes.append(self.start_workers(self.workers))
        args = [sys.executable, "-m", "dagster", "dev", "-h", "127.0.0.1", "-p", str(self.ui_port)]
        dagster = subprocess.Popen(
            [*args, "--log-level", self.log_level],
            env=self.env,
            cwd=self.root,
            preexec_fn=_default_signals,
            start_new_session=True,
        )
        self.processes.append(dagster)
        wait_http(f"{self.ui_url}/server_info", dagster, timeout=180)

    def start_workers(self, count: int) -> subprocess.Popen[bytes]:
        """Worker processes sharing the stack's instance and queues."""
        return subprocess.Popen(
            [sys.executable, "-m", "dagster_taskiq_cancel", "worker", "--workers", str(count)],
            env=self.env,
            cwd=self.root,
            start_new_session=True,  # only `dev` gets a terminal's Ctrl-C; it stops us in order
        )

    def stop(self) -> None:
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
                    print(f"{proc.args[2:4]} exited with {proc.returncode}; stopping", flush=True)  # type: ignore[index]
                    return 1
            time.sleep(0.2)
        return 0


def run_dev(ui_port: int, workers: int, log_level: str = "info") -> int:
    stack = DevStack(Path.cwd(), ui_port, workers, os.environ, log_level=log_level)
    try:
        stack.start()
        print(
            f"\nDagster UI: {stack.ui_url}\n"
            f"SQS: {stack.env.get(TaskiqCancelSettings.env_var('endpoint_url'), 'AWS')}, "
            f"{workers} worker process(es). Press Ctrl-C to stop everything.\n",
            flush=True,
        )
        return stack.wait()
    except (DevError, SettingsError, SqsError) as exc:
        print(f"dagster-taskiq-cancel dev: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C while starting: stop what started, quietly
        return 130
    finally:
        stack.stop()
