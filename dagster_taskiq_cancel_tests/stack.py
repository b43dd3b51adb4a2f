"""A real deployment for tests: unique queues on a real SQS server, a Dagster home with our
launcher, and real worker processes, each stopped by its pid."""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from dagster import (
    DagsterEvent,
    DagsterEventType,
    DagsterInstance,
    DagsterRun,
    DagsterRunStatus,
    JobDefinition,
    reconstructable,
)
from dagster._core.utils import make_new_run_id
from dagster._core.workspace.context import WorkspaceProcessContext
from dagster._core.workspace.load_target import EmptyWorkspaceTarget
from dagster._daemon.monitoring.run_monitoring import execute_run_monitoring_iteration

from dagster_taskiq_cancel import claims
from dagster_taskiq_cancel.cancel import WRITERS, pooled_instance
from dagster_taskiq_cancel.local_sqs import LOCAL_CREDENTIALS
from dagster_taskiq_cancel.queues import SyncQueues
from dagster_taskiq_cancel.settings import TaskiqCancelSettings
from dagster_taskiq_cancel.tasks import run_task_message

T = TypeVar("T")

# Every test whose subject is SQS runs on both servers (moto and ministack). A test whose subject
# is the worker, Dagster or the sensor's logic crosses only SQS paths those tests cover, so it runs
# on moto alone: the suite keeps its 40-minute budget on a 2-core machine.
MOTO_ONLY = pytest.mark.moto_only


def wait_for(condition: Callable[[], T], timeout: float, what: str, interval: float = 0.02) -> T:
    """Poll ``condition`` until it returns something truthy; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def graphql(base_url: str, query: str, **variables: Any) -> dict[str, Any]:
    """POST one GraphQL document to a Dagster webserver; fail on GraphQL errors."""
    request = urllib.request.Request(
        f"{base_url}/graphql",
        data=json.dumps({"query": query, "variables": variables}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        body = json.load(response)
    if body.get("errors"):
        raise RuntimeError(f"GraphQL errors: {body['errors']}")
    return body["data"]


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):  # gone before, or while, it was read
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def child_pids(parent: int, cmdline_contains: str = "") -> list[int]:
    """Live children of ``parent`` whose command line contains ``cmdline_contains``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (FileNotFoundError, ProcessLookupError):
            continue
        if ppid == parent and cmdline_contains in cmdline and pid_alive(int(proc.name)):
            found.append(int(proc.name))
    return found


def task_pids(worker: int, cmdline_contains: str) -> list[int]:
    """The Dagster child processes of ``worker`` (each runs under its guard)."""
    return [
        pid
        for guard in child_pids(worker, cmdline_contains)
        for pid in child_pids(guard, cmdline_contains)
    ]


def worker_pid(worker_id: str) -> int:
    """The pid in a worker id (``host:pid:boot``)."""
    return int(worker_id.split(":")[1])


def descendant_pids(root: int) -> set[int]:
    """Every live process below ``root``, however deep."""
    found: set[int] = set()
    stack = [root]
    while stack:
        for pid in child_pids(stack.pop()):
            found.add(pid)
            stack.append(pid)
    return found


def stop_process(
    proc: subprocess.Popen[Any], signum: int = signal.SIGTERM, timeout: float = 15
) -> None:
    """Signal one process by pid, wait, and SIGKILL it if it does not exit in time."""
    if proc.poll() is None:
        proc.send_signal(signum)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Deployment:
    """Queues, a Dagster home and worker processes that share them."""

    def __init__(
        self,
        root: Path,
        endpoint_url: str,
        instance_config: Mapping[str, Any] | None = None,
        **settings: Any,
    ) -> None:
        """``instance_config`` adds top-level dagster.yaml keys (storage, run coordinator);
        ``settings`` override the launcher's test defaults (a unique queue name, short times)."""
        self.root = root
        self.home = root / "dagster_home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.markers = root / "markers"
        self.logs = root / "logs"
        self.logs.mkdir(exist_ok=True)
        defaults = {
            "queue_name": f"t{uuid.uuid4().hex[:12]}",
            "grace_seconds": 5,
            "drain_seconds": 1,
        }
        self.settings = TaskiqCancelSettings(endpoint_url=endpoint_url, **{**defaults, **settings})
        self.queues = SyncQueues(self.settings)
        self.queues.create_all()
        launcher_config = self.settings.model_dump(exclude_none=True)
        (self.home / "dagster.yaml").write_text(
            yaml.safe_dump(
                {
                    "run_launcher": {
                        "module": "dagster_taskiq_cancel",
                        "class": "TaskiqRunLauncher",
                        "config": launcher_config,
                    },
                    "telemetry": {"enabled": False},
                    **(instance_config or {}),
                }
            )
        )
        self.env = {**os.environ, **LOCAL_CREDENTIALS, "DAGSTER_HOME": str(self.home)}
        self.instance = DagsterInstance.from_config(str(self.home))
        self.workers: list[subprocess.Popen[bytes]] = []

    # --- workers -----------------------------------------------------------------------------

    def start_worker(
        self, *args: str, module: str = "dagster_taskiq_cancel"
    ) -> subprocess.Popen[bytes]:
        """Start one worker process (``python -m module worker``) and wait until it listens."""
        log = self.logs / f"worker-{len(self.workers)}.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", module, "worker", *args],
            env=self.env,
            cwd=self.root,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        self.workers.append(proc)
        wait_for(
            lambda: proc.poll() is not None or b" ready" in log.read_bytes(), 60, f"{log} ready"
        )
        assert proc.poll() is None, log.read_text()
        return proc

    def worker_log(self, index: int) -> str:
        return (self.logs / f"worker-{index}.log").read_text()

    def stop(self) -> None:
        for proc in self.workers:
            stop_process(proc)
        self.instance.dispose()

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # --- runs --------------------------------------------------------------------------------

    def create_run(
        self,
        job: JobDefinition,
        seconds: float = 0.0,
        run_config: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> DagsterRun:
        """A run of ``job``; without ``run_config`` its first op gets the marker config."""
        if run_config is None:
            op_name = next(iter(job.graph.node_dict))
            op_config = {"marker_dir": str(self.markers), "seconds": seconds}
            run_config = {"ops": {op_name: {"config": op_config}}}
        # As a launch from the UI does, the job's run tags go on the run.
        tags = {**job.run_tags, **kwargs.pop("tags", {})}
        return self.instance.create_run_for_job(
            job_def=job,
            run_config=run_config,
            job_code_origin=reconstructable(job).get_python_origin(),
            tags=tags,
            **kwargs,
        )

    def launch(
        self,
        job: JobDefinition,
        seconds: float = 0.0,
        run_config: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> str:
        run = self.create_run(job, seconds, run_config, **kwargs)
        self.instance.launch_run(run.run_id, workspace=None)  # type: ignore[arg-type]
        return run.run_id

    def status(self, run_id: str) -> DagsterRunStatus:
        run = self.instance.get_run_by_id(run_id)
        assert run is not None
        return run.status

    def wait_status(
        self, run_id: str, statuses: set[DagsterRunStatus], timeout: float = 60
    ) -> None:
        wait_for(lambda: self.status(run_id) in statuses, timeout, f"run {run_id} in {statuses}")

    def op_pid(self, run_id: str, timeout: float = 60) -> int:
        """The pid of the process running the run's op, once it has started."""
        marker = self.markers / f"{run_id}.pid"
        return int(wait_for(lambda: marker.exists() and marker.read_text(), timeout, f"{marker}"))

    def executions(self, run_id: str) -> int:
        marker = self.markers / f"{run_id}.executions"
        return len(marker.read_text().splitlines()) if marker.exists() else 0

    def queue_empty(self) -> bool:
        return all(
            counts["visible"] == 0 and counts["in_flight"] == 0
            for name, counts in self.queues.depths().items()
            if name != self.queues.names.acks
        )

    def engine_messages(self, run_id: str) -> list[str]:
        return [
            entry.dagster_event.message or ""
            for entry in self.instance.all_logs(run_id)
            if entry.dagster_event is not None
        ]

    def tags(self, run_id: str) -> Mapping[str, str]:
        run = self.instance.get_run_by_id(run_id)
        assert run is not None
        return run.tags


def monitor_until(
    deployment: Deployment, condition: Callable[[], T], timeout: float, what: str
) -> T:
    """Run Dagster's own run-monitoring iteration (as its daemon does) until ``condition``."""
    with WorkspaceProcessContext(deployment.instance, EmptyWorkspaceTarget()) as context:

        def tick() -> T:
            list(execute_run_monitoring_iteration(context, logging.getLogger("monitoring")))
            return condition()

        return wait_for(tick, timeout, what, interval=0.5)


def create_pending_runs(
    deployment: Deployment, job: JobDefinition, count: int, tags: Mapping[str, str] | None = None
) -> list[str]:
    """``count`` runs of ``job``, alternately NOT_STARTED and STARTING with the task in SQS.

    Copies of one run record rather than ``count`` job snapshots, and the launcher's two effects
    (STARTING, the task message) without its per-run engine event, ten messages per request,
    written as a bulk cancel writes (``pooled_instance``, ``WRITERS`` at once): the set-up is not
    what bulk cancel tests measure, and one call at a time it takes minutes.
    """
    template = deployment.create_run(job, seconds=600, tags=dict(tags or {}))

    def add(instance: DagsterInstance, index: int) -> DagsterRun:
        run = (
            template
            if index == 0
            else instance.add_run(template._replace(run_id=make_new_run_id()))
        )
        if index % 2:
            event = DagsterEvent(DagsterEventType.RUN_STARTING.value, job_name=run.job_name)
            instance.report_dagster_event(event, run.run_id)
            claims.record_sent(instance, run.run_id, run.run_id)
        return run

    with pooled_instance(deployment.instance) as instance, ThreadPoolExecutor(WRITERS) as pool:
        runs = list(pool.map(functools.partial(add, instance), range(count)))
    messages = [run_task_message(run.run_id) for run in runs[1::2]]
    failures = deployment.queues.send_batch(
        deployment.queues.names.main, [(m.body, m.task_id, m.task_id) for m in messages]
    )
    if failures:
        raise RuntimeError(f"could not queue the task messages: {failures[:3]}")
    return [run.run_id for run in runs]


def main_queue_empty(deployment: Deployment) -> bool:
    """Every task message is taken (cancel hints may still be draining)."""
    depth = deployment.queues.depths()[deployment.queues.names.main]
    return depth == {"visible": 0, "in_flight": 0}


def hold(instance: DagsterInstance, run_id: str, worker_id: str) -> None:
    """Make ``worker_id`` the run's holder as its claim of the run task would."""
    if claims.sent_of(instance, run_id) is None:
        claims.record_sent(instance, run_id, run_id)
    assert claims.claim(instance, run_id, worker_id)
