"""Dagster's re-executions and run retries of a run that ran on a worker each run once, on a
worker; and a long fan-out runs each step once.

Dagster copies a run's tags to its re-executions and retries, bookkeeping tags included: none
of them may block or misroute the child (claims live in ``claims``, not in tags). The UI's
re-execution is its GraphQL mutation, served in process over a real code server; the run-retry
daemon's iteration is called as the daemon calls it.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dagster import DagsterRunStatus, RunsFilter
from dagster._core.workspace.context import WorkspaceRequestContext
from dagster._daemon.auto_run_reexecution.auto_run_reexecution import (
    consume_new_runs_for_automatic_reexecution,
)
from dagster_graphql.test.utils import define_out_of_process_context, execute_dagster_graphql

from dagster_taskiq_cancel.local_sqs import LocalSqsServer
from dagster_taskiq_cancel.tasks import WORKER_ID_TAG
from dagster_taskiq_cancel_tests import reexecution_defs
from dagster_taskiq_cancel_tests.stack import MOTO_ONLY, Deployment
from dagster_taskiq_cancel_tests.step_jobs import fan_job, fan_run_config, step_records

pytestmark = MOTO_ONLY

SUCCESS, FAILURE = DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE
RUN_TIMEOUT = 120

LAUNCH = """
mutation($p: ExecutionParams!) { launchRun(executionParams: $p) {
  __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message } } }
"""
REEXECUTE = """
mutation($p: ReexecutionParams!) { launchRunReexecution(reexecutionParams: $p) {
  __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message } } }
"""


@pytest.fixture
def deployment(tmp_path: Path, sqs_server: LocalSqsServer) -> Iterator[Deployment]:
    config = {
        "run_retries": {"enabled": True, "max_retries": 1},
        # The webserver's launch without a queue daemon: the launcher is called at once.
        "run_coordinator": {
            "module": "dagster._core.run_coordinator",
            "class": "DefaultRunCoordinator",
        },
    }
    with Deployment(tmp_path, sqs_server.endpoint_url, instance_config=config) as stack:
        yield stack


def launched(result: Any, field: str) -> str:
    answer = result.data[field] if result.data else result.errors
    assert result.data and answer["__typename"] == "LaunchRunSuccess", answer
    return str(answer["run"]["runId"])


def executions(deployment: Deployment) -> collections.Counter[tuple[str, str]]:
    path = deployment.markers / "executions"
    lines = path.read_text().splitlines() if path.exists() else []
    return collections.Counter(tuple(line.split()) for line in lines)  # type: ignore[misc]


def run_tasks_started(deployment: Deployment, run_id: str) -> int:
    return sum("started run task" in m for m in deployment.engine_messages(run_id))


def test_reexecutions_and_retries_of_a_worker_run_each_run_once_on_a_worker(
    deployment: Deployment,
) -> None:
    deployment.markers.mkdir(exist_ok=True)
    deployment.start_worker()
    instance = deployment.instance
    with define_out_of_process_context(reexecution_defs.__file__, None, instance) as context:
        assert isinstance(context, WorkspaceRequestContext)
        location = context.code_location_names[0]
        selector = {
            "repositoryLocationName": location,
            "repositoryName": "__repository__",
            "jobName": "flaky_job",
        }
        config = {"marker_dir": str(deployment.markers)}
        run_config = {"ops": {"first": {"config": config}, "second": {"config": config}}}
        params = {"selector": selector, "runConfigData": run_config}
        parent = launched(execute_dagster_graphql(context, LAUNCH, {"p": params}), "launchRun")
        deployment.wait_status(parent, {FAILURE}, RUN_TIMEOUT)
        assert run_tasks_started(deployment, parent) == 1

        children = {}
        for strategy in ("ALL_STEPS", "FROM_FAILURE"):
            params = {"parentRunId": parent, "strategy": strategy}
            result = execute_dagster_graphql(context, REEXECUTE, {"p": params})
            children[strategy] = launched(result, "launchRunReexecution")
            # Dagster copied the parent's bookkeeping tags to the child.
            assert WORKER_ID_TAG in deployment.tags(children[strategy])
        # The run-retry daemon's iteration, as the daemon runs it.
        records = instance.get_run_records(filters=RunsFilter(run_ids=[parent]))
        for _ in consume_new_runs_for_automatic_reexecution(
            context.process_context, records, logging.getLogger(__name__)
        ):
            pass
        retries = instance.get_runs(filters=RunsFilter(tags={"dagster/parent_run_id": parent}))
        retry = next(r.run_id for r in retries if r.run_id not in children.values())
        children["retry"] = retry

        for run_id in children.values():
            deployment.wait_status(run_id, {SUCCESS, FAILURE}, RUN_TIMEOUT)
        assert {k: deployment.status(r) for k, r in children.items()} == dict.fromkeys(
            children, SUCCESS
        )
        done = executions(deployment)
        assert done[(children["ALL_STEPS"], "first")] == 1
        for run_id in children.values():
            assert done[(run_id, "second")] == 1, done
            assert run_tasks_started(deployment, run_id) == 1


def test_a_long_fan_out_runs_each_step_once(tmp_path: Path, sqs_server: LocalSqsServer) -> None:
    """16 steps, four at a time, each longer than ``step_claim_timeout_seconds``: every claim
    is kept though the claims of one run are written at the same moment, so no running step
    is taken for lost (and retried: ``part`` has a retry policy). Spare slots: a finished step's
    process takes seconds to exit on a busy machine, and its slot is not free before; the next
    step must not wait for it past the claim timeout."""
    with Deployment(tmp_path, sqs_server.endpoint_url, step_claim_timeout_seconds=4) as deployment:
        for _ in range(2):
            deployment.start_worker("--concurrency", "4")
        run_config = {
            **fan_run_config(deployment.root, width=16, seconds=6),
            "execution": {"config": {"max_concurrent": 4}},
        }
        run_id = deployment.launch(fan_job, run_config=run_config)
        deployment.wait_status(run_id, {SUCCESS, FAILURE}, 240)
        counts = collections.Counter(r.step_key for r in step_records(deployment.markers, run_id))
        assert deployment.status(run_id) == SUCCESS, deployment.engine_messages(run_id)[-5:]
        assert len(counts) == 18 and set(counts.values()) == {1}, counts
