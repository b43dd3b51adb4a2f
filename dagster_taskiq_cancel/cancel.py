"""Ask for a run to stop: the one sequence shared by the launcher's terminate() and the resource.

The order is the point (DESIGN rule 4): CANCELING is recorded first because it is the durable
intent every worker polls for; the CancelRequest is only a hint that makes the holder look now.
"""

from __future__ import annotations

import logging

from dagster import DagsterInstance

from dagster_taskiq_cancel.messages import CancelRequest
from dagster_taskiq_cancel.queues import SqsError, SyncQueues

logger = logging.getLogger(__name__)


def request_cancel(
    instance: DagsterInstance, queues: SyncQueues, run_id: str, reason: str, requested_by: str
) -> bool:
    """Record CANCELING, then send the fast-path hint; True once the intent is recorded.

    A failed send is logged and noted on the run, not raised: it only delays the stop until the
    holding worker's next run-storage poll.
    """
    run = instance.get_run_by_id(run_id)
    if run is None or run.is_finished:
        return False
    request = CancelRequest(run_id=run_id, reason=reason, requested_by=requested_by)
    instance.report_run_canceling(
        run, message=f"Cancel requested by {requested_by}; request {request.request_id}."
    )
    try:
        queues.send(
            queues.names.cancels, request.to_json(), group_id=run_id, dedup_id=request.request_id
        )
    except SqsError as exc:
        logger.warning(
            "Cancel message for run %s not sent (%s); the poll will stop it", run_id, exc
        )
        instance.report_engine_event(
            f"Cancel message not sent ({exc}); workers will see CANCELING at their next poll.", run
        )
    return True
