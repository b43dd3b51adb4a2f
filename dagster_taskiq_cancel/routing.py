"""Where a run or a step goes: its pool (and so its task queue), and the lane its priority picks.

A run goes to the pool its ``dagster-taskiq/queue`` tag names (Dagster puts a job's and an asset
job's tags on the run), else the one its ops' tags name (an asset's ``op_tags``), else its code
location's default pool (``location_queues``), else the default pool (the main queue). A step of
``taskiq_executor`` goes to its op's tag, else its run's pool. With ``priority_lanes``, work whose
``dagster/priority`` is above 0 goes to its queue's high lane, which workers drain first: lanes,
never SQS delays, which would hold urgent work back rather than bring it forward.
"""

from __future__ import annotations

from collections.abc import Mapping

from dagster import DagsterInstance, DagsterRun

from dagster_taskiq_cancel.queues import DEFAULT_POOL, QueueNames
from dagster_taskiq_cancel.settings import TaskiqCancelSettings
from dagster_taskiq_cancel.tasks import EXECUTOR_NAME, QUEUE_TAG

PRIORITY_TAG = "dagster/priority"


def location_pools(settings: TaskiqCancelSettings) -> dict[str, str]:
    """``location_queues`` as a mapping (its form is checked when the settings are built)."""
    pairs = (item.split("=", 1) for item in settings.location_queues.split(",") if item.strip())
    return {location.strip(): pool.strip() for location, pool in pairs}


def served_pools(settings: TaskiqCancelSettings) -> list[str]:
    """The pools a worker serves: ``serve_queues``, else the default pool."""
    pools = [pool.strip() for pool in settings.serve_queues.split(",") if pool.strip()]
    return pools or [DEFAULT_POOL]


def plan_pool(instance: DagsterInstance, run: DagsterRun) -> str | None:
    """The one pool the ops a run executes name in their tags, when its ops run in its own
    process: so that a UI materialization of an asset with ``op_tags`` naming `gpu` goes to
    `gpu`. None: no op names one, several name different ones, or the run sends each step to
    its own pool (``taskiq_executor``)."""

    if run.execution_plan_snapshot_id is None:
        return None
    plan = instance.get_execution_plan_snapshot(run.execution_plan_snapshot_id)
    if plan.executor_name == EXECUTOR_NAME:
        return None
    keys = set(plan.step_keys_to_execute or [step.key for step in plan.steps])
    named = {(step.tags or {}).get(QUEUE_TAG) for step in plan.steps if step.key in keys}
    pools = named - {None, ""}
    return pools.pop() if len(pools) == 1 else None


def run_pool(run: DagsterRun, settings: TaskiqCancelSettings, ops_pool: str | None = None) -> str:
    """The pool of a run: its tag, else the one its ops name (``plan_pool``), else its code
    location's default, else the default pool."""
    tagged = run.tags.get(QUEUE_TAG) or ops_pool
    if tagged:
        return tagged
    origin = run.remote_job_origin
    location = origin.location_name if origin is not None else None
    return location_pools(settings).get(location or "", DEFAULT_POOL)


def priority(*tags: Mapping[str, str]) -> int:
    """The first ``dagster/priority`` found in ``tags`` (op tags before run tags), else 0.

    A value that is not a whole number counts as 0, as Dagster's run queue reads it.
    """
    for found in tags:
        value = found.get(PRIORITY_TAG)
        if value is not None:
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


def task_queue(
    names: QueueNames, settings: TaskiqCancelSettings, pool: str, *tags: Mapping[str, str]
) -> str:
    """The queue a task of ``pool`` goes to: the pool's queue, or its high lane for work with
    a priority above 0 when lanes are on (``SqsError`` for an unusable pool name)."""
    queue = names.pool_queue(pool)
    return names.lane_queue(queue, settings.priority_lanes and priority(*tags) > 0)
