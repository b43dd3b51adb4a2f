"""Bulk cancel and the audit trail, on real workers, a real SQS server and the real CLI."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from dagster import DagsterEventType, DagsterRun, DagsterRunStatus, JobDefinition, RunsFilter
from dagster._core.remote_origin import (
    RegisteredCodeLocationOrigin,
    RemoteJobOrigin,
    RemoteRepositoryOrigin,
)
from dagster._core.storage.tags import MAX_RETRIES_TAG

from dagster_taskiq_cancel import EmptyFilterError, TaskiqCancelResource, cancel_runs
from dagster_taskiq_cancel.local_sqs import LocalSqsServer
from dagster_taskiq_cancel_tests.jobs import sleepy_job
from dagster_taskiq_cancel_tests.stack import (
    MOTO_ONLY,
    Deployment,
    create_pending_runs,
    main_queue_empty,
    pid_alive,
    wait_for,
)
from dagster_taskiq_cancel_tests.test_sensor import tick_until

CANCELED = DagsterRunStatus.CANCELED


def create_queued(deployment: Deployment, job: JobDefinition, **kwargs: Any) -> DagsterRun:
    """A QUEUED run; Dagster wants to know where the daemon would load it from (it never does)."""
    code_location = RegisteredCodeLocationOrigin("tests")
    origin = RemoteJobOrigin(RemoteRepositoryOrigin(code_location, "__repository__"), job.name)
    return deployment.create_run(
        job, status=DagsterRunStatus.QUEUED, remote_job_origin=origin, **kwargs
    )


def cli(deployment: Deployment, *args: str) -> subprocess.CompletedProcess[str]:
    """`dagster-taskiq-cancel cancel ...` against the deployment's Dagster home, no stdin."""
    return subprocess.run(
        [sys.executable, "-m", "dagster_taskiq_cancel", "cancel", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=deployment.env,
        stdin=subprocess.DEVNULL,
    )


def cancels_sent(deployment: Deployment) -> int:
    counts = deployment.queues.depths()[deployment.queues.names.cancels]
    return counts["visible"] + counts["in_flight"]


def audit_lines(deployment: Deployment, run_id: str) -> list[str]:
    return [m for m in deployment.engine_messages(run_id) if m.startswith("Cancel requested by")]


@MOTO_ONLY
def test_bulk_cancel_by_tag_stops_queued_waiting_and_running_runs(deployment: Deployment) -> None:
    """200 runs by tag: 120 QUEUED, 77 waiting in SQS, 3 running; none runs to completion."""
    tag = {"batch": uuid.uuid4().hex}
    deployment.start_worker("--concurrency", "3")
    running = [deployment.launch(sleepy_job, seconds=300, tags=tag) for _ in range(3)]
    pids = [deployment.op_pid(run_id) for run_id in running]
    waiting = [deployment.launch(sleepy_job, seconds=300, tags=tag) for _ in range(77)]
    queued = [create_queued(deployment, sleepy_job, seconds=300, tags=tag) for _ in range(120)]
    queued_ids = [run.run_id for run in queued]
    other = create_queued(deployment, sleepy_job).run_id
    for run_id in running:
        deployment.wait_status(run_id, {DagsterRunStatus.STARTED})
    everything = running + waiting + queued_ids
    before = {run_id: deployment.status(run_id) for run_id in [*everything, other]}

    dry = cli(deployment, "--tag", f"batch={tag['batch']}", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would_cancel 200" in dry.stdout
    unconfirmed = cli(deployment, "--tag", f"batch={tag['batch']}")
    assert unconfirmed.returncode != 0
    assert "Aborted" in unconfirmed.stderr and "Traceback" not in unconfirmed.stderr
    refused = cli(deployment, "--yes", "--status", "QUEUED")
    assert refused.returncode != 0 and "refusing" in refused.stderr
    assert {run_id: deployment.status(run_id) for run_id in before} == before
    assert cancels_sent(deployment) == 0
    assert all(deployment.executions(run_id) == 0 for run_id in waiting + queued_ids)

    started = time.monotonic()
    done = cli(
        deployment,
        "--tag",
        f"batch={tag['batch']}",
        "--yes",
        "--reason",
        "bad config",
        "--requested-by",
        "alice",
    )
    print(f"\nCLI bulk cancel of 200 runs: {time.monotonic() - started:.2f}s (process included)")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "runs by status: QUEUED 120, STARTED 3, STARTING 77" in done.stdout, done.stdout
    assert "actions: canceled 120, canceling 80" in done.stdout, done.stdout

    for pid in pids:
        wait_for(lambda pid=pid: not pid_alive(pid), 30, f"op pid {pid} gone")
    assert all(deployment.status(run_id) == CANCELED for run_id in queued_ids)
    assert deployment.status(other) == DagsterRunStatus.QUEUED, "outside the filter"
    tick_until(
        deployment,
        lambda: all(deployment.status(run_id) == CANCELED for run_id in everything),
        timeout=180,
    )
    assert all(deployment.executions(run_id) == 0 for run_id in waiting + queued_ids)
    assert all(deployment.executions(run_id) == 1 for run_id in running)
    for run_id in (running[0], waiting[0], queued_ids[0]):
        (line,) = audit_lines(deployment, run_id)
        assert "alice" in line and "reason: bad config" in line
    success = deployment.instance.get_run_records(
        filters=RunsFilter(tags=tag, statuses=[DagsterRunStatus.SUCCESS])
    )
    assert not success


@MOTO_ONLY
def test_every_cancel_path_records_who_why_and_when(deployment: Deployment) -> None:
    """Terminate from the webserver says "ui"; the resource and bulk cancel name their caller."""
    terminated, by_resource, by_bulk = (
        deployment.create_run(sleepy_job, status=DagsterRunStatus.STARTING).run_id for _ in range(3)
    )
    queued = create_queued(deployment, sleepy_job).run_id
    assert deployment.instance.run_launcher.terminate(terminated)
    taskiq = TaskiqCancelResource(**deployment.settings.model_dump(exclude_none=True))
    assert taskiq.cancel_run(deployment.instance, by_resource, reason="nightly cleanup")
    result = cancel_runs(
        deployment.instance, run_ids=[by_bulk, queued], reason="wrong data", requested_by="bob"
    )
    assert result.ok and result.by_action == {"canceling": 1, "canceled": 1}

    expected = {
        terminated: ("ui", "terminate"),
        by_resource: ("resource", "nightly cleanup"),
        by_bulk: ("bob", "wrong data"),
        queued: ("bob", "wrong data"),
    }
    for run_id, (who, why) in expected.items():
        (line,) = audit_lines(deployment, run_id)
        assert f"requested by {who} at 20" in line and f"reason: {why};" in line, line
    canceling = deployment.instance.get_records_for_run(
        by_bulk, of_type=DagsterEventType.RUN_CANCELING
    ).records
    assert canceling[0].event_log_entry.dagster_event.message.startswith("Cancel requested by bob")
    (audit_event,) = [
        e
        for e in deployment.instance.all_logs(queued, of_type=DagsterEventType.ENGINE_EVENT)
        if e.dagster_event and (e.dagster_event.message or "").startswith("Cancel requested")
    ]
    metadata = audit_event.dagster_event.engine_event_data.metadata
    assert metadata["requested_by"].value == "bob" and metadata["reason"].value == "wrong data"
    assert {"request_id", "requested_at"} <= set(metadata)
    assert deployment.status(queued) == CANCELED

    again = cancel_runs(deployment.instance, run_ids=[queued, "no-such-run"], requested_by="bob")
    assert again.ok and again.by_action == {"skipped": 2}
    assert again.by_status == {"CANCELED": 1, "missing": 1}
    with pytest.raises(EmptyFilterError):
        cancel_runs(deployment.instance, statuses=[DagsterRunStatus.STARTED])


@pytest.mark.postgres
@pytest.mark.parametrize("sqs_server", ["ministack"], indirect=True)
def test_one_thousand_pending_runs_are_cancelled_and_none_starts(
    tmp_path: Path, sqs_server: LocalSqsServer, storage: dict[str, Any]
) -> None:
    """1,000 runs waiting in SQS (STARTING) or not yet launched: intent and hint for each, then
    workers take every waiting message and start none of them (benchmarks/bulk_cancel.py
    measures the time). On Postgres only (see conftest), the storage a fleet that size shares,
    and on ministack, which answers the 3,000-odd requests of the workers in seconds: moto
    answers one request at a time (about 20 ms each) and would take a minute.
    """
    with Deployment(tmp_path, sqs_server.endpoint_url, instance_config=storage) as deployment:
        tag = {"batch": uuid.uuid4().hex}
        run_ids = create_pending_runs(deployment, sleepy_job, 1000, tag)
        started, cpu_started = time.monotonic(), time.process_time()
        result = cancel_runs(deployment.instance, tags=tag, reason="benchmark")
        elapsed = time.monotonic() - started
        cpu = time.process_time() - cpu_started
        print(f"\nbulk cancel of 1,000 pending runs: {elapsed:.2f}s wall, {cpu:.2f}s CPU")
        assert result.ok, [o for o in result.outcomes if o.error][:3]
        assert result.by_status == {"NOT_STARTED": 500, "STARTING": 500}
        assert result.by_action == {"canceling": 1000} and result.hints_unsent == 0
        assert cancels_sent(deployment) == 1000
        canceling = deployment.instance.get_runs_count(
            RunsFilter(tags=tag, statuses=[DagsterRunStatus.CANCELING])
        )
        assert canceling == len(run_ids)
        tags = deployment.instance.get_run_tags(tag_keys=[MAX_RETRIES_TAG])
        assert tags == [(MAX_RETRIES_TAG, {"0"})], "no cancelled run can be retried"

        for _ in range(2):
            deployment.start_worker("--concurrency", "4")
        wait_for(lambda: main_queue_empty(deployment), 240, "every task taken", interval=0.5)
        assert sum(deployment.executions(run_id) for run_id in run_ids) == 0
        assert not deployment.instance.get_runs_count(
            RunsFilter(tags=tag, statuses=[DagsterRunStatus.STARTED, DagsterRunStatus.SUCCESS])
        ), "a cancelled run started"
