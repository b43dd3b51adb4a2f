"""Terminate through the real Dagster UI in a real browser, on the stack `make dev` starts."""

from __future__ import annotations

import contextlib
import json
import os
import re
import statistics
import time
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from dagster import DagsterInstance, DagsterRunStatus
from playwright.sync_api import Page, expect, sync_playwright

from dagster_taskiq_cancel.dev import DevStack, descendants
from dagster_taskiq_cancel.local_sqs import LocalSqsServer, free_port
from dagster_taskiq_cancel.queues import SyncQueues
from dagster_taskiq_cancel.sensor import EVENT_PREFIX as SENSOR_PREFIX
from dagster_taskiq_cancel.settings import settings_from_env
from dagster_taskiq_cancel_tests.stack import MOTO_ONLY, pid_alive, wait_for
from dagster_taskiq_cancel_tests.tour import STEPS

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
SHOTS = REPO / "test-output" / "ui"
PID_RE = re.compile(r"started run task as pid (\d+)")
CONFIRM_TO_CANCELED: list[float] = []

pytestmark = [
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian chromium"),
    MOTO_ONLY,  # browser tests are slow and exercise the UI, not SQS
]


def make_stack(tmp_path: Path, sqs: LocalSqsServer, workers: int) -> DevStack:
    """The stack `make dev` starts, on its own queues and Dagster home."""
    env = {
        **os.environ,
        "DAGSTER_TASKIQ_ENDPOINT_URL": sqs.endpoint_url,
        "DAGSTER_TASKIQ_QUEUE_NAME": f"ui{uuid.uuid4().hex[:10]}",
    }
    return DevStack(REPO, free_port(), workers, env, home=tmp_path / "home")


@contextlib.contextmanager
def running_stack(tmp_path: Path, sqs: LocalSqsServer, workers: int) -> Iterator[DevStack]:
    dev = make_stack(tmp_path, sqs, workers)
    try:
        dev.start()
        yield dev
    finally:
        dev.stop()


@pytest.fixture
def stack(tmp_path: Path, sqs_server: LocalSqsServer) -> Iterator[DevStack]:
    with running_stack(tmp_path, sqs_server, workers=1) as dev:
        yield dev


@pytest.fixture
def queued_stack(tmp_path: Path, sqs_server: LocalSqsServer) -> Iterator[DevStack]:
    """No worker yet: launched runs wait in SQS."""
    with running_stack(tmp_path, sqs_server, workers=0) as dev:
        yield dev


@pytest.fixture
def page(request: pytest.FixtureRequest) -> Iterator[Page]:
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        tab = browser.new_page(viewport={"width": 1400, "height": 900})
        try:
            yield tab
        finally:
            if getattr(request.node, "rep_call", None) is None or request.node.rep_call.failed:
                tab.screenshot(path=str(SHOTS / f"{request.node.name}-failure.png"))
            browser.close()


def shot(page: Page, name: str) -> None:
    page.screenshot(path=str(SHOTS / f"{name}.png"), animations="disabled")


def instance_of(stack: DevStack) -> DagsterInstance:
    return DagsterInstance.from_config(str(stack.home))


def graphql_launch(stack: DevStack) -> str:
    query = """
    mutation($p: ExecutionParams!) { launchRun(executionParams: $p) {
      __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message } } }"""
    params = {
        "selector": {
            "repositoryLocationName": "example_project",
            "repositoryName": "__repository__",
            "jobName": "long_job",
        },
        "runConfigData": {},
    }
    request = urllib.request.Request(
        f"{stack.ui_url}/graphql",
        data=json.dumps({"query": query, "variables": {"p": params}}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        result = json.load(response)["data"]["launchRun"]
    assert result["__typename"] == "LaunchRunSuccess", result
    return result["run"]["runId"]


def wait_header(page: Page, text: str, timeout_ms: int = 60_000) -> None:
    expect(page.get_by_text(text, exact=True).first).to_be_visible(timeout=timeout_ms)


def run_pid(instance: DagsterInstance, run_id: str) -> int:
    def find() -> int | None:
        for entry in instance.all_logs(run_id):
            match = (
                PID_RE.search(entry.dagster_event.message or "") if entry.dagster_event else None
            )
            if match:
                return int(match.group(1))
        return None

    return wait_for(find, 90, "the worker's start event with the pid")


def named(label: str) -> re.Pattern[str]:
    """An accessible name ending in ``label``: Dagster puts its icon's name in front."""
    return re.compile(rf"(^|\s){re.escape(label)}$")


def click(page: Page, kind: str, label: str) -> None:
    target = page.get_by_role(kind, name=named(label)).first  # type: ignore[arg-type]
    expect(target).to_be_enabled(timeout=60_000)
    target.click()


def wait_started(page: Page, instance: DagsterInstance, run_id: str) -> None:
    wait_for(
        lambda: instance.get_run_by_id(run_id).status == DagsterRunStatus.STARTED,  # type: ignore[union-attr]
        120,
        "run STARTED",
    )
    try:
        wait_header(page, "Started", 5_000)
    except AssertionError:
        # Dagster's own race, as often with its DefaultRunLauncher (benchmarks/ui_header.py):
        # the status refetch the UI sends on RUN_START can still read STARTING and holds the
        # header there until its next 15 s poll. A reload reads the status afresh (the tour
        # says so).
        page.reload()
        wait_header(page, "Started")
    wait_for(
        lambda: any("working... step" in e.user_message for e in instance.all_logs(run_id)),
        60,
        "the op's first `working... step` line, which the tour waits for",
    )


def follow_the_tour(page: Page, stack: DevStack, steps: Sequence[tuple[str, str]]) -> str:
    """Do ``steps`` of the README's tour (``tour.STEPS``) as a user would; returns the run id.

    Starts on the UI's front page unless the run page is open already (the GraphQL launch).
    """
    instance = instance_of(stack)
    run_id = page.url.rsplit("/runs/", 1)[1] if "/runs/" in page.url else ""
    if not run_id:
        page.goto(stack.ui_url)
    for kind, label in steps:
        if kind == "status" and label == "Started":
            wait_started(page, instance, run_id)
            shot(page, "started")
        elif kind == "status":
            wait_header(page, label)
            shot(page, label.lower())
        elif label == "Terminate 1 run":
            shot(page, "dialog")
            clicked = time.monotonic()
            click(page, kind, label)
            wait_header(page, "Canceled")
            CONFIRM_TO_CANCELED.append(time.monotonic() - clicked)
        else:
            click(page, kind, label)
            if label == "View":
                page.wait_for_url(re.compile(r"/runs/[0-9a-f-]{36}"), timeout=60_000)
                run_id = page.url.rsplit("/runs/", 1)[1].split("?")[0]
    return run_id


@pytest.mark.parametrize("launch_via", ["tour", "graphql"])
def test_terminate_in_the_ui_ends_canceled(stack: DevStack, page: Page, launch_via: str) -> None:
    """The README's tour, click for click; and the same Terminate on a run launched by GraphQL."""
    instance = instance_of(stack)
    steps = list(STEPS)
    if launch_via == "graphql":
        page.goto(f"{stack.ui_url}/runs/{graphql_launch(stack)}")
        steps = steps[steps.index(("status", "Started")) :]
    run_id = follow_the_tour(page, stack, steps)
    print(f"\nconfirm click -> header Canceled: {CONFIRM_TO_CANCELED[-1]:.2f}s")
    pid = run_pid(instance, run_id)
    wait_for(lambda: not pid_alive(pid), 30, f"worker child {pid} gone")
    assert instance.get_run_by_id(run_id).status == DagsterRunStatus.CANCELED  # type: ignore[union-attr]
    interrupted = [
        e.dagster_event.step_failure_data.error.cls_name  # type: ignore[union-attr]
        for e in instance.all_logs(run_id)
        if e.dagster_event and e.dagster_event.event_type_value == "STEP_FAILURE"
    ]
    assert interrupted == ["DagsterExecutionInterruptedError"], "the tour's red Errored step"
    wait_for(
        lambda: any(
            m.startswith(SENSOR_PREFIX) and "acknowledged the cancel" in m
            for m in (
                e.dagster_event.message or "" for e in instance.all_logs(run_id) if e.dagster_event
            )
        ),
        90,
        "the sensor's engine event for the worker's ack",
    )
    if len(CONFIRM_TO_CANCELED) > 1:
        print(f"median confirm -> Canceled: {statistics.median(CONFIRM_TO_CANCELED):.2f}s")


def test_force_terminate_of_a_run_waiting_in_sqs_then_a_worker_skips_it(
    queued_stack: DevStack, page: Page
) -> None:
    instance = instance_of(queued_stack)
    run_id = graphql_launch(queued_stack)
    wait_for(
        lambda: instance.get_run_by_id(run_id).status == DagsterRunStatus.STARTING,  # type: ignore[union-attr]
        120,
        "run STARTING (sent to SQS, no worker yet)",
    )
    page.goto(f"{queued_stack.ui_url}/runs/{run_id}")
    wait_header(page, "Starting")
    page.get_by_role("button", name=re.compile(r"Terminate$")).click()
    dialog = page.get_by_role("dialog").filter(has_text="Terminate runs")
    force = dialog.get_by_role("button", name="Force termination for 1 run", exact=True)
    expect(force).to_be_enabled(timeout=30_000)
    shot(page, "force-dialog")
    force.click()
    wait_header(page, "Canceled")
    shot(page, "force-canceled")
    worker = queued_stack.start_workers(1)
    queued_stack.processes.append(worker)
    queues = SyncQueues(settings_from_env(environ=queued_stack.env))
    wait_for(
        lambda: queues.depths()[queues.names.main] == {"visible": 0, "in_flight": 0},
        60,
        "the worker took the message and deleted it",
    )
    assert instance.get_run_by_id(run_id).status == DagsterRunStatus.CANCELED  # type: ignore[union-attr]
    assert not any(
        e.dagster_event and e.dagster_event.event_type_value == "PIPELINE_START"
        for e in instance.all_logs(run_id)
    )


def test_dev_stack_stops_every_process_it_started(
    tmp_path: Path, sqs_server: LocalSqsServer
) -> None:
    dev = make_stack(tmp_path, sqs_server, workers=2)
    try:
        dev.start()
        pids = [p.pid for p in dev.processes]
        pids += [d for p in dev.processes for d in descendants(p.pid)]
    finally:
        started = time.monotonic()
        dev.stop()
        elapsed = time.monotonic() - started
    assert not [pid for pid in pids if pid_alive(pid)]
    assert elapsed < 60, f"stopping took {elapsed:.1f}s"
