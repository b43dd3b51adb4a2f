"""Acknowledgements: what a worker tells the reconciliation sensor about each stop."""

from __future__ import annotations

import asyncio
import logging
import uuid

from dagster_taskiq_cancel import metrics
from dagster_taskiq_cancel.broker import CancellableSqsBroker
from dagster_taskiq_cancel.messages import CancelAck, Codec, Outcome
from dagster_taskiq_cancel.worker.held import HeldTask

logger = logging.getLogger(__name__)


class Acks:
    """Sends one worker's acks to ``{queue}-cancel-acks``.

    An ack that cannot be sent (the queue refuses us, SQS is down) is retried in the background
    for ``retry_seconds`` at most: the task that sends it ends at once and frees its slot. An
    ack never sent costs only time: the reconciliation sensor's timeout ends the run.
    """

    def __init__(
        self, broker: CancellableSqsBroker, codec: Codec, worker_id: str, retry_seconds: float
    ) -> None:
        self.broker = broker
        self.codec = codec
        self.worker_id = worker_id
        self.retry_seconds = retry_seconds
        self.retrying: set[asyncio.Task[None]] = set()

    async def send(
        self,
        run_id: str,
        step_key: str | None,
        task_id: str,
        outcome: Outcome,
        detail: str,
        held: HeldTask | None = None,
    ) -> bool:
        """Tell the sensor what happened; True once sent. A failed send is retried in the
        background (``retry_seconds``)."""
        metrics.stop_outcome(outcome)
        request = held.request if held else None
        ack = CancelAck(
            request_id=request.request_id if request else None,
            run_id=run_id,
            step_key=step_key,
            task_id=task_id,
            worker_id=self.worker_id,
            outcome=outcome,
            requested_at=request.requested_at
            if request
            else (held.stop_started_at if held else None),
            detail=detail,
        )
        body, dedup_id = self.codec.dumps(ack), uuid.uuid4().hex
        try:
            await self.broker.send(self.broker.names.acks, body, run_id, dedup_id)
            return True
        except asyncio.CancelledError:
            logger.error("Worker shut down before the %s ack for run %s was sent", outcome, run_id)
            raise
        except Exception as exc:
            logger.warning("Could not send %s ack for run %s: %s", outcome, run_id, exc)
        task = asyncio.get_running_loop().create_task(self._retry(ack, body, dedup_id))
        self.retrying.add(task)
        task.add_done_callback(self.retrying.discard)
        return False

    async def _retry(self, ack: CancelAck, body: str, dedup_id: str) -> None:
        """``send_until_sent`` with the same deduplication id, for ``retry_seconds`` at most."""
        what = f"{ack.outcome} ack for run {ack.run_id}"
        try:
            await asyncio.wait_for(
                self.broker.send_until_sent(self.broker.names.acks, body, ack.run_id, dedup_id),
                self.retry_seconds,
            )
        except asyncio.TimeoutError:
            logger.error(
                "Gave up sending the %s after %gs: the reconciliation sensor's timeout ends the "
                "run instead",
                what,
                self.retry_seconds,
            )
        except asyncio.CancelledError:
            logger.error("Worker shut down before the %s was sent", what)
            raise
        except Exception as exc:
            logger.error("Could not send the %s: %s", what, exc)
        else:
            logger.info("Sent the %s on a later try", what)
