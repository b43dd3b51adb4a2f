"""The worker host's HTTP endpoint: ``/metrics`` for Prometheus, ``/healthz`` and ``/readyz``
for orchestrators, on ``metrics_host:metrics_port`` (off unless a port is set).

One endpoint per host: a lone worker process serves its own registry; with ``--workers N`` the
parent serves the sum of its children (prometheus_client's multiprocess mode, in a private
directory), and its health is theirs: unhealthy as soon as one child is.

- live (``/healthz``): every loop of every process runs, and each heartbeat loop went round
  within ``heartbeat_timeout_seconds`` (so the event loop is not blocked);
- ready (``/readyz``): live, and the run storage answered within half the heartbeat timeout,
  and the latest SQS receive answered.

Both are read from the same gauges Prometheus scrapes, so an alert and a probe never disagree.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Collection
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from dagster_taskiq_cancel.metrics import (
    HEARTBEAT_LOOP,
    MULTIPROC_ENV,
    PREFIX,
    SERVED_BY_PARENT_ENV,
)
from dagster_taskiq_cancel.settings import TaskiqCancelSettings

logger = logging.getLogger(__name__)

LIVE_PATH = "/healthz"
READY_PATH = "/readyz"

_LOOP_UP = f"{PREFIX}loop_up"
_LOOP_TICK = f"{PREFIX}loop_last_tick_timestamp_seconds"
_STORAGE = f"{PREFIX}storage_last_success_timestamp_seconds"
_SQS_UP = f"{PREFIX}sqs_up"
_HEALTH_SAMPLES = frozenset({_LOOP_UP, _LOOP_TICK, _STORAGE, _SQS_UP})

Values = dict[tuple[str, str], float]  # (sample name, loop label) -> value, of one process


class EndpointError(RuntimeError):
    """The endpoint cannot listen (port taken, address not here): the worker does not start."""


def problems(
    registry: CollectorRegistry,
    settings: TaskiqCancelSettings,
    ready: bool,
    expected: Collection[str] | None = None,
) -> list[str]:
    """Why the host is not live (or not ready); empty when it is.

    ``expected`` are the pids of the processes to judge (the parent's children); None judges
    the one process whose registry this is.
    """
    by_pid: defaultdict[str, Values] = defaultdict(dict)
    for family in registry.collect():
        for sample in family.samples:
            if sample.name in _HEALTH_SAMPLES:
                key = (sample.name, sample.labels.get("loop", ""))
                by_pid[sample.labels.get("pid", "")][key] = sample.value
    pids = sorted(by_pid) if expected is None else sorted(expected)
    found = []
    for pid in pids:
        where = f"worker process {pid}: " if pid else ""
        found += [where + p for p in _process_problems(by_pid.get(pid, {}), settings, ready)]
    return found


def _process_problems(values: Values, settings: TaskiqCancelSettings, ready: bool) -> list[str]:
    now = time.time()
    loops = {loop: up for (name, loop), up in values.items() if name == _LOOP_UP}
    tick = values.get((_LOOP_TICK, HEARTBEAT_LOOP))
    if not loops or tick is None:
        return ["starting: its loops have not reported yet"] if ready else []
    found = [f"its {loop} ended" for loop, up in sorted(loops.items()) if up != 1]
    stall = settings.heartbeat_timeout_seconds
    if now - tick > stall:
        found.append(f"its heartbeat loop has not gone round for {now - tick:.0f}s (> {stall:g}s)")
    if not ready:
        return found
    answered = now - values.get((_STORAGE, ""), 0.0)
    if answered > stall / 2:
        found.append(f"the run storage has not answered for {answered:.0f}s (> {stall / 2:g}s)")
    if values.get((_SQS_UP, "")) != 1:
        found.append("its latest SQS receive failed")
    return found


class Endpoint:
    """The HTTP server, in a daemon thread: a probe is answered even while the event loop is
    busy, and a blocked event loop shows as a stalled heartbeat loop, not as a hung probe."""

    def __init__(
        self,
        settings: TaskiqCancelSettings,
        registry: CollectorRegistry,
        expected: Callable[[], Collection[str]] | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.expected = expected
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                status, content_type, body = endpoint.answer(self.path.split("?")[0])
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                logger.debug("metrics endpoint: " + format, *args)

        address = (settings.metrics_host, settings.metrics_port or 0)
        try:
            self.server = ThreadingHTTPServer(address, Handler)
        except OSError as exc:
            raise EndpointError(
                f"Cannot serve metrics on {address[0]}:{address[1]}: {exc.strerror or exc} "
                f"(set metrics_port/metrics_host, or {TaskiqCancelSettings.env_var('metrics_port')}"
                f" and {TaskiqCancelSettings.env_var('metrics_host')})"
            ) from None
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, name="metrics", daemon=True).start()
        logger.info("Serving /metrics, %s and %s on %s:%s", LIVE_PATH, READY_PATH, *address)

    def answer(self, path: str) -> tuple[int, str, bytes]:
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        if path not in (LIVE_PATH, READY_PATH):
            return 404, "text/plain", b"not found: /metrics, /healthz or /readyz\n"
        expected = self.expected() if self.expected else None
        found = problems(self.registry, self.settings, path == READY_PATH, expected)
        body = "".join(f"{p}\n" for p in found) or "ok\n"
        return (503 if found else 200), "text/plain; charset=utf-8", body.encode()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def probe(settings: TaskiqCancelSettings, live: bool, timeout: float) -> tuple[bool, str]:
    """Ask this host's endpoint; (healthy, what it said or why it did not answer)."""
    if settings.metrics_port is None:
        return False, (
            "No metrics port is set: the probe asks the worker's endpoint, so set "
            f"{TaskiqCancelSettings.env_var('metrics_port')} for the worker and the probe alike "
            "(the probe does not read dagster.yaml)"
        )
    host = settings.metrics_host
    host = "127.0.0.1" if host in ("", "0.0.0.0") else "::1" if host == "::" else host
    host = f"[{host}]" if ":" in host else host
    url = f"http://{host}:{settings.metrics_port}{LIVE_PATH if live else READY_PATH}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return True, response.read().decode().strip()
    except urllib.error.HTTPError as exc:
        return False, exc.read().decode().strip()
    except OSError as exc:
        return False, f"No answer from {url}: {getattr(exc, 'reason', exc)}"


def serve_process(settings: TaskiqCancelSettings) -> Endpoint | None:
    """A lone worker process's endpoint; None when off, or when its parent serves (N > 1)."""
    if settings.metrics_port is None or os.environ.get(SERVED_BY_PARENT_ENV):
        return None
    return Endpoint(settings, REGISTRY)


class ChildrenEndpoint:
    """The endpoint of ``--workers N``'s parent: its children write to a private directory,
    which it serves summed (gauges of health per child) and removes at the end."""

    def __init__(self, settings: TaskiqCancelSettings) -> None:
        self.env: dict[str, str] = {}
        self.live: set[int] = set()
        self._directory: str | None = None
        self._endpoint: Endpoint | None = None
        if settings.metrics_port is None:
            return
        self._directory = tempfile.mkdtemp(prefix="dagster-taskiq-cancel-metrics-")
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self._directory)
        try:
            self._endpoint = Endpoint(settings, registry, self._live_pids)
        except EndpointError:
            self.close()
            raise
        self.env = {MULTIPROC_ENV: self._directory, SERVED_BY_PARENT_ENV: "1"}

    def _live_pids(self) -> list[str]:
        return [str(pid) for pid in tuple(self.live)]  # a copy: the main thread changes it

    def process_dead(self, pid: int) -> None:
        """Forget a child that exited: its live gauges go, its counters stay in the sums."""
        self.live.discard(pid)
        if self._directory is not None:
            mark_process_dead(pid, self._directory)

    def close(self) -> None:
        if self._endpoint is not None:
            self._endpoint.close()
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
