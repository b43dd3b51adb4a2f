"""The worker host's /metrics, /healthz and /readyz, scraped over HTTP from real workers."""

from __future__ import annotations

import socket
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from dagster import DagsterRunStatus
from prometheus_client.parser import text_string_to_metric_families

from dagster_taskiq_cancel.local_sqs import LocalSqsServer
from dagster_taskiq_cancel.settings import TaskiqCancelSettings
from dagster_taskiq_cancel_tests.jobs import sleepy_job
from dagster_taskiq_cancel_tests.stack import MOTO_ONLY, Deployment, pid_alive, wait_for

P = "dagster_taskiq_cancel_"
Samples = list[tuple[str, dict[str, str], float]]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)


def scrape(port: int) -> Samples:
    status, text = get(port, "/metrics")
    assert status == 200, text
    return [
        (s.name, s.labels, s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    return sum(
        value
        for n, have, value in samples
        if n == P + name and all(have.get(k) == v for k, v in labels.items())
    )


def probe(deployment: Deployment, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dagster_taskiq_cancel", "health", *args],
        env=deployment.env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@MOTO_ONLY
def test_two_worker_processes_count_runs_and_cancels_on_one_endpoint(
    deployment: Deployment,
) -> None:
    """`--workers 2`: the parent serves the sum of both processes (multiprocess mode)."""
    port = free_port()
    deployment.start_worker("--workers", "2", "--concurrency", "2", "--metrics-port", str(port))
    wait_for(lambda: deployment.worker_log(0).count(" ready") == 2, 60, "both processes ready")
    wait_for(lambda: get(port, "/readyz")[0] == 200, 30, "the host ready")
    quick = [deployment.launch(sleepy_job, seconds=0) for _ in range(2)]
    slow = [deployment.launch(sleepy_job, seconds=300) for _ in range(2)]
    pids = [deployment.op_pid(run_id) for run_id in slow]
    for run_id in quick:
        deployment.wait_status(run_id, {DagsterRunStatus.SUCCESS})
    for run_id in slow:
        deployment.wait_status(run_id, {DagsterRunStatus.STARTED})
    wait_for(
        lambda: total(scrape(port), "tasks_in_flight", kind="run") == 2, 30, "two runs in flight"
    )

    for run_id in slow:
        assert deployment.instance.run_launcher.terminate(run_id)
    for pid in pids:
        wait_for(lambda pid=pid: not pid_alive(pid), 30, f"op {pid} gone")
    wait_for(
        lambda: total(scrape(port), "cancel_latency_seconds_count", kind="run") == 2,
        30,
        "both cancel latencies measured",
    )
    # Each terminate hints the holder's own queue and the shared one; some worker reads each.
    wait_for(lambda: total(scrape(port), "cancel_requests_total") == 4, 30, "all four hints read")
    samples = scrape(port)
    assert total(samples, "tasks_received_total", kind="run") == 4
    assert total(samples, "tasks_started_total", kind="run") == 4
    assert total(samples, "tasks_finished_total", kind="run", outcome="succeeded") == 2
    assert total(samples, "tasks_finished_total", kind="run", outcome="cancelled") == 2
    assert total(samples, "tasks_in_flight") == 0
    assert total(samples, "queue_wait_seconds_count", kind="run") == 4
    assert total(samples, "task_duration_seconds_count", kind="run") == 4
    assert total(samples, "stop_outcomes_total", outcome="cancelled") == 2
    assert 0 < total(samples, "cancel_latency_seconds_sum") < 30
    assert total(samples, "sqs_errors_total") == total(samples, "storage_errors_total") == 0
    loops = {(s[1]["pid"], s[1]["loop"]) for s in samples if s[0] == P + "loop_up" and s[2] == 1}
    assert len({pid for pid, _ in loops}) == 2 and len(loops) == 12, loops
    reporting = {s[1]["pid"] for s in samples if "pid" in s[1]}
    assert reporting == {pid for pid, _ in loops}, "only the worker processes, not their tasks"
    run_ids = set(quick + slow)
    assert not any(v in run_ids for _, labels, _ in samples for v in labels.values())
    assert get(port, "/healthz") == (200, "ok\n")
    print("\n" + get(port, "/metrics")[1])


@MOTO_ONLY
def test_readiness_turns_unhealthy_while_the_run_storage_is_locked_and_recovers(
    tmp_path: Path, sqs_server: LocalSqsServer
) -> None:
    """An exclusive lock on sqlite's runs.db: the worker's storage calls stop answering."""
    deployment = Deployment(tmp_path, sqs_server.endpoint_url, heartbeat_timeout_seconds=3)
    port = free_port()
    deployment.env[TaskiqCancelSettings.env_var("metrics_port")] = str(port)
    try:
        deployment.start_worker()
        wait_for(lambda: get(port, "/readyz")[0] == 200, 30, "ready")
        healthy = probe(deployment)
        assert (healthy.returncode, healthy.stdout) == (0, "ok\n"), healthy.stderr
        lock = sqlite3.connect(deployment.home / "history" / "runs.db", timeout=30)
        try:
            lock.execute("BEGIN EXCLUSIVE")
            wait_for(lambda: get(port, "/readyz")[0] == 503, 30, "unready while locked")
            unready = probe(deployment)
            assert unready.returncode == 1
            assert "the run storage has not answered" in unready.stdout, unready
            assert get(port, "/healthz") == (200, "ok\n"), "its loops still run"
            assert probe(deployment, "--live").returncode == 0
        finally:
            lock.rollback()
            lock.close()
        wait_for(lambda: get(port, "/readyz")[0] == 200, 30, "ready again")
        samples = scrape(port)
        assert total(samples, "storage_errors_total", operation="beat") >= 1
        deployment.env.pop(TaskiqCancelSettings.env_var("metrics_port"))
        off = probe(deployment)
        assert off.returncode == 1 and "No metrics port is set" in off.stdout, off
        taken = subprocess.run(
            [sys.executable, "-m", "dagster_taskiq_cancel", "worker", "--metrics-port", str(port)],
            env=deployment.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert taken.returncode == 1
        assert f"Cannot serve metrics on 127.0.0.1:{port}: Address already in use" in taken.stderr
    finally:
        deployment.stop()
