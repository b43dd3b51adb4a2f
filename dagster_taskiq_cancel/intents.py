"""Record the cancel intent of a batch of runs in one Postgres transaction.

Dagster's own path for one run (``add_run_tags`` then ``report_run_canceling``) is seven
statements, each committed on its own, and with dagster-postgres each storage call on a new
connection: about 20 ms a run even on a pooled local server. When the run storage and the
event log share one Postgres database (dagster.yaml ``storage: postgres``), the same rows are
written here for up to ten runs in one transaction: the runs are locked and re-read, every run
still live gets its ``dagster/max_retries: 0`` tag, the CANCELING status with its body, and
the RUN_CANCELING event with the audit line, and a run that finished since the caller read it is
left alone (DESIGN rule 6). Other storages take Dagster's own path (``None`` here).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime

import sqlalchemy as db
from dagster import DagsterEvent, DagsterEventType, DagsterInstance, DagsterRun, DagsterRunStatus
from dagster._core.events.log import EventLogEntry
from dagster._core.storage.event_log.sql_event_log import SqlEventLogStorage
from dagster._core.storage.runs.schema import RunsTable, RunTagsTable
from dagster._core.storage.runs.sql_run_storage import SqlRunStorage
from dagster._serdes import deserialize_value, serialize_value
from dagster._time import get_current_datetime

# A run in one of these has not finished: it may (again) be moved to CANCELING.
CANCELABLE = (
    DagsterRunStatus.NOT_STARTED,
    DagsterRunStatus.STARTING,
    DagsterRunStatus.STARTED,
    DagsterRunStatus.CANCELING,
)


def batchable(instance: DagsterInstance) -> bool:
    """Run storage and event log in one Postgres database, so one transaction covers both."""
    runs, events = instance.run_storage, instance.event_log_storage
    url = getattr(runs, "postgres_url", None)
    return (
        isinstance(runs, SqlRunStorage)
        and isinstance(events, SqlEventLogStorage)
        and url is not None
        and url == getattr(events, "postgres_url", None)
    )


def record_canceling(
    instance: DagsterInstance,
    messages: Mapping[str, str],
    tags_for: Callable[[DagsterRun], Mapping[str, str]],
) -> dict[str, DagsterRunStatus]:
    """Tag and mark CANCELING the runs in ``messages`` (run id → audit line) that are still live.

    Returns the status each run had in the transaction; those not CANCELABLE were not written.
    """
    runs_storage = instance.run_storage
    assert isinstance(runs_storage, SqlRunStorage)
    events_storage = instance.event_log_storage
    assert isinstance(events_storage, SqlEventLogStorage)
    with runs_storage.connect() as conn:
        # dagster-postgres engines autocommit every statement: this block is one transaction.
        conn.execution_options(isolation_level="READ COMMITTED")
        with conn.begin():
            rows = conn.execute(
                db.select(RunsTable.c.run_id, RunsTable.c.run_body, RunsTable.c.status)
                .where(RunsTable.c.run_id.in_(list(messages)))
                .with_for_update()
            ).fetchall()
            found = {row.run_id: (row.run_body, DagsterRunStatus(row.status)) for row in rows}
            live = {
                run_id: deserialize_value(body, DagsterRun)
                for run_id, (body, status) in found.items()
                if status in CANCELABLE
            }
            now = get_current_datetime()
            for run in live.values():
                _write_run(conn, run, tags_for(run), now)
            if live:
                entries = [_canceling_entry(run, messages[run.run_id]) for run in live.values()]
                conn.execute(events_storage.prepare_insert_event_batch(entries))
    return {run_id: status for run_id, (_, status) in found.items()}


def _write_run(
    conn: db.Connection, run: DagsterRun, tags: Mapping[str, str], now: datetime
) -> None:
    """As ``add_run_tags`` and ``handle_run_event`` write it: the body, the status, tag rows."""
    updated = run.with_status(DagsterRunStatus.CANCELING).with_tags({**run.tags, **tags})
    conn.execute(
        RunsTable.update()
        .where(RunsTable.c.run_id == run.run_id)
        .values(
            run_body=serialize_value(updated),
            status=DagsterRunStatus.CANCELING.value,
            update_timestamp=now,
        )
    )
    for key, value in tags.items():
        if key in run.tags:
            conn.execute(
                RunTagsTable.update()
                .where(db.and_(RunTagsTable.c.run_id == run.run_id, RunTagsTable.c.key == key))
                .values(value=value)
            )
        else:
            conn.execute(RunTagsTable.insert().values(run_id=run.run_id, key=key, value=value))


def _canceling_entry(run: DagsterRun, message: str) -> EventLogEntry:
    """The event ``report_run_canceling`` would store."""
    event = DagsterEvent(
        event_type_value=DagsterEventType.PIPELINE_CANCELING.value,
        job_name=run.job_name,
        message=message,
    )
    return EventLogEntry(
        user_message="",
        level=20,  # logging.INFO, as report_dagster_event
        job_name=run.job_name,
        run_id=run.run_id,
        error_info=None,
        timestamp=get_current_datetime().timestamp(),
        step_key=None,
        dagster_event=event,
    )
