"""Scenario 2: terminate → CANCELED through the UI's own GraphQL mutation, ours vs Dagster's
DefaultRunLauncher, both `dagster dev` stacks up at once on the same example project.

Each pair launches ``long_job`` on both stacks, waits until its step runs and times
``terminateRuns(SAFE_TERMINATE)`` until ``runOrError`` says CANCELED: the path behind the
UI's Terminate button, without the browser's rendering in the figure.
"""

from __future__ import annotations

import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from benchmarks.harness import REPO, Context
from benchmarks.stats import Row, pairwise_ratio_row
from dagster_taskiq_cancel.dev import HOME_DIR, DevStack
from dagster_taskiq_cancel.local_sqs import free_port
from dagster_taskiq_cancel_tests.stack import graphql as post_graphql
from dagster_taskiq_cancel_tests.stack import wait_for

LAUNCH = """mutation($p: ExecutionParams!) { launchRun(executionParams: $p) {
  __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message } } }"""
TERMINATE = """mutation($ids: [String!]!) {
  terminateRuns(runIds: $ids, terminatePolicy: SAFE_TERMINATE) { __typename
    ... on TerminateRunsResult { terminateRunResults { __typename
      ... on TerminateRunFailure { message } ... on PythonError { message } } }
    ... on PythonError { message } } }"""
STATUS = """query($id: ID!) { runOrError(runId: $id) { __typename
  ... on Run { status stepStats { status } } } }"""
JOB = {
    "repositoryLocationName": "example_project",
    "repositoryName": "__repository__",
    "jobName": "long_job",
}


def graphql(stack: DevStack, query: str, **variables: Any) -> dict[str, Any]:
    return post_graphql(stack.ui_url, query, **variables)


def status(stack: DevStack, run_id: str) -> str:
    return graphql(stack, STATUS, id=run_id)["runOrError"].get("status", "")


def step_running(stack: DevStack, run_id: str) -> bool:
    run = graphql(stack, STATUS, id=run_id)["runOrError"]
    return run.get("status") == "STARTED" and any(
        step["status"] == "IN_PROGRESS" for step in run.get("stepStats", [])
    )


def launch(stack: DevStack) -> str:
    result = graphql(stack, LAUNCH, p={"selector": JOB, "runConfigData": {}})["launchRun"]
    if result["__typename"] != "LaunchRunSuccess":
        raise RuntimeError(f"launchRun: {result}")
    return result["run"]["runId"]


def terminate_to_canceled(stack: DevStack) -> float:
    """Launch, wait until its step runs, then time terminateRuns → CANCELED (polled every 20 ms).

    Waiting for the step (not only STARTED) keeps out a Dagster race that both launchers hit:
    a run interrupted while its multiprocess executor is still spawning the step process can
    ignore the interrupt until it is killed (ours: SIGKILL after grace_seconds).
    """
    run_id = launch(stack)
    wait_for(lambda: step_running(stack, run_id), 180, f"run {run_id} step in progress")
    started = time.monotonic()
    result = graphql(stack, TERMINATE, ids=[run_id])["terminateRuns"]
    outcomes = [r["__typename"] for r in result.get("terminateRunResults", [])]
    if outcomes != ["TerminateRunSuccess"]:
        raise RuntimeError(f"terminateRuns: {result}")
    wait_for(lambda: status(stack, run_id) == "CANCELED", 120, f"run {run_id} CANCELED")
    return time.monotonic() - started


def default_launcher_root(root: Path) -> Path:
    """A folder like the repository's, but whose dagster.yaml has no run_launcher: Dagster's
    DefaultRunLauncher with the same coordinator and monitoring as ours."""
    config = yaml.safe_load((REPO / HOME_DIR / "dagster.yaml").read_text())
    config.pop("run_launcher")
    (root / HOME_DIR).mkdir()
    (root / HOME_DIR / "dagster.yaml").write_text(yaml.safe_dump(config))
    workspace = yaml.safe_load((REPO / "workspace.yaml").read_text())
    for entry in workspace["load_from"]:
        entry["python_module"]["working_directory"] = str(REPO)
    (root / "workspace.yaml").write_text(yaml.safe_dump(workspace))
    return root


def stack_env(ctx: Context) -> dict[str, str]:
    """Own queues per stack: the example's reconciliation sensor runs in both and reads acks."""
    return {
        **os.environ,
        "DAGSTER_TASKIQ_ENDPOINT_URL": ctx.endpoint_url,
        "DAGSTER_TASKIQ_QUEUE_NAME": f"ui{uuid.uuid4().hex[:10]}",
        "DAGSTER_TASKIQ_GRACE_SECONDS": "5",
    }


def start_stacks(ctx: Context, workers: int = 1) -> tuple[DevStack, DevStack]:
    """Ours with ``workers`` worker processes, and Dagster's, each in its own scratch folder."""
    ours_home = ctx.scratch(f"ui-ours-{workers}") / "home"
    default_root = default_launcher_root(ctx.scratch(f"ui-default-{workers}"))
    ours = DevStack(REPO, free_port(), workers, stack_env(ctx), home=ours_home)
    default = DevStack(default_root, free_port(), 0, stack_env(ctx), home=default_root / "home")
    return ours, default


def run(ctx: Context) -> list[Row]:
    ours, default = start_stacks(ctx)
    try:
        with ThreadPoolExecutor(2) as pool:  # both start at once: half the wall time
            for future in [pool.submit(ours.start), pool.submit(default.start)]:
                future.result()
        mine: list[float] = []
        theirs: list[float] = []
        for index in range(ctx.size.ui_pairs):
            order = [(ours, mine), (default, theirs)]
            for stack, samples in order if index % 2 == 0 else reversed(order):
                samples.append(terminate_to_canceled(stack))
    finally:
        for stack in (ours, default):
            stack.stop()
    return [
        pairwise_ratio_row(
            "2 GraphQL terminateRuns",
            "terminate → CANCELED [s]",
            mine,
            theirs,
            "DefaultRunLauncher",
        )
    ]
