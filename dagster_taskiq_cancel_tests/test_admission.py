"""Step admission reads one launch record, never the run's event log: in process, against a real
run storage (sqlite; Postgres where the storage matters) and a real SQS server, with the run
process's own step handler launching the steps of a wide run (``benchmarks.wide_run``)."""

from __future__ import annotations

import base64
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as db
import yaml
from dagster import DagsterInstance
from dagster._core.execution.plan.outputs import StepOutputHandle
from dagster._core.execution.plan.state import PastExecutionState
from dagster._core.storage.runs.schema import KeyValueStoreTable
from dagster._grpc.types import ExecuteStepArgs
from dagster._serdes import deserialize_value

from benchmarks.wide_run import FAN, WideRun
from dagster_taskiq_cancel import claims, hints
from dagster_taskiq_cancel.local_sqs import LocalSqsServer
from dagster_taskiq_cancel.queues import SyncQueues
from dagster_taskiq_cancel.settings import TaskiqCancelSettings
from dagster_taskiq_cancel.tasks import CLAIM_TAG, step_holder_tag, step_task_id
from dagster_taskiq_cancel.worker.admission import Admitted, Gate
from dagster_taskiq_cancel_tests.postgres import PostgresCluster, storage_config
from dagster_taskiq_cancel_tests.stack import MOTO_ONLY

pytestmark = MOTO_ONLY

STEPS = 30


def _instance(factory: pytest.TempPathFactory, config: dict[str, Any]) -> Iterator[DagsterInstance]:
    home = factory.mktemp("home")
    (home / "dagster.yaml").write_text(yaml.safe_dump({"telemetry": {"enabled": False}, **config}))
    with DagsterInstance.from_config(str(home)) as instance:
        yield instance


@pytest.fixture(scope="module")
def sqlite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DagsterInstance]:
    yield from _instance(tmp_path_factory, {})


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def any_storage(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DagsterInstance]:
    if request.param == "sqlite":
        yield request.getfixturevalue("sqlite")
        return
    cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
    yield from _instance(tmp_path_factory, storage_config(cluster.database()))


@pytest.fixture(scope="module")
def settings(sqs_server: LocalSqsServer) -> TaskiqCancelSettings:
    settings = TaskiqCancelSettings(queue_name="admission", endpoint_url=sqs_server.endpoint_url)
    SyncQueues(settings).create_all()
    return settings


@pytest.fixture
def wide(sqlite: DagsterInstance, settings: TaskiqCancelSettings) -> Iterator[WideRun]:
    with WideRun(sqlite, settings, STEPS) as run:
        yield run


@pytest.fixture
def wide_any(any_storage: DagsterInstance, settings: TaskiqCancelSettings) -> Iterator[WideRun]:
    """The same, on each run storage: where the launch record's upsert is the subject."""
    with WideRun(any_storage, settings, STEPS) as run:
        yield run


def _finish(wide: WideRun, index: int) -> None:
    wide.finish([StepOutputHandle(f"part[{index}]", "result", None)])


def _child_args(admitted: Admitted) -> ExecuteStepArgs:
    """The arguments the worker gives its ``dagster api execute_step`` child, decoded as the
    child decodes them."""
    packed = admitted.env["DAGSTER_COMPRESSED_EXECUTE_STEP_ARGS"]
    return deserialize_value(zlib.decompress(base64.b64decode(packed)).decode(), ExecuteStepArgs)


def test_a_launched_step_starts_from_the_state_its_executor_gave_it(
    wide_any: WideRun, tmp_path: Path
) -> None:
    """Its inputs' outputs, its retry count, the run's dynamic mappings and parent runs; none
    of the other outputs the executor's state lists (they grow with the run), which the step
    never reads."""
    wide = wide_any
    for index in range(3):
        wide.launch(index)
        _finish(wide, index)
    read = StepOutputHandle(FAN, "result", "7")
    unread = StepOutputHandle("part[3]", "result", None)
    grandparent = PastExecutionState("grandparent", {read, unread}, None)
    wide.state = wide.state._replace(
        parent_state=PastExecutionState("parent", {unread}, grandparent)
    )
    task_id = wide.launch(7, attempt=1)
    gate = Gate(wide.instance, "w", tmp_path)
    admitted = gate.admit(task_id, wide.run.run_id, "part[7]", 1, False)
    assert isinstance(admitted, Admitted)
    args = _child_args(admitted)
    assert args.run_id == wide.run.run_id and args.step_keys_to_execute == ["part[7]"]
    assert args.should_verify_step
    state = args.known_state
    assert state is not None
    assert state.ready_outputs == {read}
    assert state.previous_retry_attempts == {"part[7]": 1}
    assert state.dynamic_mappings == {FAN: {"result": [str(i) for i in range(STEPS)]}}
    # A re-execution's parent runs: each still named, each listing only what the step reads.
    assert state.parent_state == PastExecutionState(
        "parent", set(), PastExecutionState("grandparent", {read}, None)
    )


class Statements:
    """Every SQL statement any engine of this process runs, while counting."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def __call__(self, _conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        self.seen.append(statement)

    def during(self, fn: Any, *args: Any) -> tuple[Any, list[str]]:
        self.seen = []
        db.event.listen(db.engine.Engine, "before_cursor_execute", self)
        try:
            return fn(*args), self.seen
        finally:
            db.event.remove(db.engine.Engine, "before_cursor_execute", self)


def test_admission_runs_the_same_statements_at_step_5_and_step_25_and_reads_no_events(
    wide: WideRun, tmp_path: Path
) -> None:
    gate = Gate(wide.instance, "w", tmp_path)
    counted: dict[int, list[str]] = {}
    for index in range(STEPS - 4):
        task_id = wide.launch(index)
        step_key = f"part[{index}]"
        admitted, statements = Statements().during(
            gate.admit, task_id, wide.run.run_id, step_key, 0, False
        )
        assert isinstance(admitted, Admitted), index
        counted[index] = statements
        _finish(wide, index)
    first, last = counted[5], counted[STEPS - 5]
    assert len(first) == len(last), (first, last)
    assert not [s for s in last if "event_logs" in s], last
    assert not [s for s in last if s.startswith("UPDATE runs")], last  # its tag is there


def test_a_runs_tags_name_each_step_holder_once_however_many_steps_it_holds(
    wide: WideRun, tmp_path: Path
) -> None:
    """Dagster reads and rewrites a run's tags whole: one tag per step would make every
    admission (and every poll) of a wide run cost more with each step."""
    run_id = wide.run.run_id
    for index in range(6):
        gate = Gate(wide.instance, f"worker-{index % 2}", tmp_path)
        task_id = wide.launch(index)
        assert isinstance(gate.admit(task_id, run_id, f"part[{index}]", 0, False), Admitted)
    run = wide.instance.get_run_by_id(run_id)
    assert run is not None
    shown = [tag for tag in run.tags if tag.startswith(CLAIM_TAG)]
    assert sorted(shown) == [step_holder_tag(run_id, f"worker-{i}") for i in range(2)]
    assert hints.holders(run, None) == {"worker-0", "worker-1"}


def test_a_step_nobody_launched_as_this_task_is_refused(wide: WideRun, tmp_path: Path) -> None:
    """Each forgery names a real run under way: nothing is claimed, nothing admitted."""
    launched = wide.launch(1)
    other = WideRun(wide.instance, wide.handler.queues.settings, 3)
    run_id = wide.run.run_id
    with other:
        elsewhere = other.launch(2)
    forged = {
        "step never launched": (step_task_id(run_id, "part[2]", 0), "part[2]", 0),
        "attempt never launched": (step_task_id(run_id, "part[1]", 1), "part[1]", 1),
        "another step's task id": (launched, "part[2]", 0),
        "a step launched in another run": (elsewhere, "part[2]", 0),
    }
    gate = Gate(wide.instance, "w", tmp_path)
    for why, (task_id, step_key, attempt) in forged.items():
        assert gate.admit(task_id, run_id, step_key, attempt, False) is None, why
        assert claims.claim_of(wide.instance, task_id) is None, why
    assert isinstance(gate.admit(launched, run_id, "part[1]", 0, False), Admitted)


def test_a_step_sent_by_an_older_run_process_is_refused(wide: WideRun, tmp_path: Path) -> None:
    """A run process of a release before launch records wrote only the launch event: its step
    is dropped (its executor then fails it on ``step_claim_timeout_seconds``), rather than
    admitted by reading the run's whole event log."""
    task_id = wide.launch(4)
    key = KeyValueStoreTable.c.key == claims.launched_key(task_id)
    with claims.sql_storage(wide.instance).connect() as conn:
        conn.execute(KeyValueStoreTable.delete().where(key))
    gate = Gate(wide.instance, "w", tmp_path)
    assert gate.admit(task_id, wide.run.run_id, "part[4]", 0, False) is None
    assert claims.claim_of(wide.instance, task_id) is None


def test_a_launch_record_that_cannot_be_written_sends_nothing(
    wide: WideRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The record goes first: a task on the queue always finds it."""
    queues = wide.handler.queues
    url = queues.url(queues.names.main)

    def waiting() -> str:
        names = ["ApproximateNumberOfMessages"]
        return queues.client.get_queue_attributes(QueueUrl=url, AttributeNames=names)["Attributes"][
            names[0]
        ]

    before = waiting()

    def broken(_values: Any) -> None:
        raise OSError("storage blip")

    monkeypatch.setattr(wide.instance.run_storage, "set_cursor_values", broken)
    with pytest.raises(OSError, match="storage blip"):
        wide.launch(3)
    assert waiting() == before


def test_a_step_launched_again_starts_from_the_latest_state(
    wide_any: WideRun, tmp_path: Path
) -> None:
    """A resumed run process launches an unhealthy step's attempt anew: the record is
    rewritten, and the step starts from what the run has produced since."""
    wide = wide_any
    full = wide.state
    produced = StepOutputHandle(FAN, "result", "6")
    wide.state = full._replace(ready_outputs=full.ready_outputs - {produced})
    task_id = wide.launch(6)
    wide.state = full
    assert wide.launch(6) == task_id
    gate = Gate(wide.instance, "w", tmp_path)
    admitted = gate.admit(task_id, wide.run.run_id, "part[6]", 0, False)
    assert isinstance(admitted, Admitted)
    state = _child_args(admitted).known_state
    assert state is not None and state.ready_outputs == {produced}
