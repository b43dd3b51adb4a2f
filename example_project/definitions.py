"""The demo code location: quick assets, a long asset to terminate, a fan-out job on the fleet
whose steps share a concurrency pool, an asset for the gpu workers, and an op that cleans up
when interrupted."""

import time
from collections.abc import Iterator
from pathlib import Path
from tempfile import mkdtemp

import dagster as dg

from dagster_taskiq_cancel import (
    TaskiqCancelResource,
    cancel_reconciliation_sensor,
    taskiq_executor,
)


@dg.asset
def numbers() -> list[int]:
    """Quick: materializes in a second."""
    return list(range(10))


@dg.asset
def total(numbers: list[int]) -> int:
    return sum(numbers)


# Names the queue (pool of workers) a run or step goes to: a `gpu` worker serves this one.
GPU_QUEUE = {"dagster-taskiq/queue": "gpu"}
# A Dagster concurrency pool: `dagster instance concurrency set warehouse 2` (or the limit set
# on the UI's pool page) caps its steps across all runs.
WAREHOUSE_POOL = "warehouse"


@dg.asset(op_tags=GPU_QUEUE)
def embeddings(context: dg.AssetExecutionContext, numbers: list[int]) -> list[float]:
    """Its step goes to the `gpu` queue, whichever queue its run is on."""
    context.log.info(f"embedding {len(numbers)} numbers on a gpu worker")
    return [n / 10 for n in numbers]


class LongConfig(dg.Config):
    minutes: float = 10.0


@dg.asset
def long_running(context: dg.AssetExecutionContext, config: LongConfig) -> None:
    """Runs for minutes and reports progress: the one to click Terminate on."""
    deadline = time.monotonic() + config.minutes * 60
    step = 0
    while time.monotonic() < deadline:
        step += 1
        context.log.info(f"working... step {step}")
        time.sleep(5)


@dg.op
def with_cleanup(context: dg.OpExecutionContext) -> None:
    """Holds a scratch folder and removes it in ``finally``, also when interrupted."""
    scratch = Path(mkdtemp(prefix="dagster-taskiq-demo-"))
    context.log.info(f"created {scratch}")
    try:
        for second in range(600):
            (scratch / f"part-{second}").write_text("data")
            time.sleep(1)
    finally:
        for part in scratch.iterdir():
            part.unlink()
        scratch.rmdir()
        context.log.info(f"cleaned up {scratch}")


@dg.op(out=dg.DynamicOut(int))
def split() -> Iterator[dg.DynamicOutput[int]]:
    for i in range(6):
        yield dg.DynamicOutput(i, mapping_key=str(i))


@dg.op(pool=WAREHOUSE_POOL)
def square(context: dg.OpExecutionContext, value: int) -> int:
    context.log.info(f"squaring {value} on a taskiq worker")
    time.sleep(2)
    return value * value


@dg.op
def add_up(context: dg.OpExecutionContext, values: list[int]) -> int:
    context.log.info(f"sum of squares: {sum(values)}")
    return sum(values)


@dg.job(executor_def=taskiq_executor)
def fan_out_job() -> None:
    """Every step runs as its own taskiq task, spread over the workers; the squares wait for a
    slot of the `warehouse` pool, and Terminate frees the slots the run held."""
    add_up(split().map(square).collect())


@dg.job
def cleanup_job() -> None:
    with_cleanup()


long_job = dg.define_asset_job("long_job", selection=[long_running])
quick_job = dg.define_asset_job("quick_job", selection=[numbers, total])
# Its steps run on the workers: `embeddings` on a gpu worker, `numbers` on the main queue's.
gpu_job = dg.define_asset_job(
    "gpu_job", selection=[numbers, embeddings], executor_def=taskiq_executor
)

defs = dg.Definitions(
    assets=[numbers, total, embeddings, long_running],
    jobs=[long_job, quick_job, gpu_job, fan_out_job, cleanup_job],
    resources={"taskiq": TaskiqCancelResource()},
    sensors=[cancel_reconciliation_sensor],
)
