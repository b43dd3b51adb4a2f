"""Acknowledgements: what a worker tells the reconciliation sensor about each stop."""

from __future__ import annotations

import asyncio
import logging
import uuid

from dagster_taskiq_cancel import metrics
from dagster_taskiq_cancel.broker import CancellableSqsBroker
from dagster_taskiq_cancel.messages import CancelAck, CancelRequest, Codec, Outcome
from dagster_taskiq_cancel.worker.held import HeldTask

logger = logging.getLogger(__name__)


class Acks:
    """Sends one worker's acks to ``{queue}-cancel-acks``."""

    def __init__(self, broker: CancellableSqsBroker, codec: Codec, worker_id: str) -> None:
        self.broker = broker
        self.codec = codec
        self.worker_id = worker_id

    async def send(
        self,
        run_id: str,
        step_key: str | None,
        task_id: str,
        outcome: Outcome,
        detail: str,
        held: HeldTask | None = None,
        request: CancelRequest | None = None,
        retry: bool = True,
    ) -> None:
        """Tell the sensor what happened; a failed send is retried until shutdown.

        Only ``not_running`` (an answer to a hint, counted and nothing else) is tried once: its
        retries must not hold up the cancel loop.
        """
        metrics.stop_outcome(outcome)
        request = request or (held.request if held else None)
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
        send = self.broker.send_until_sent if retry else self.broker.send
        try:
            await send(
                self.broker.names.acks,
                self.codec.dumps(ack),
                group_id=run_id,
                dedup_id=uuid.uuid4().hex,
            )
        except asyncio.CancelledError:
            logger.error("Worker shut down before the %s ack for run %s was sent", outcome, run_id)
            raise
        except Exception as exc:
            logger.warning("Could not send %s ack for run %s: %s", outcome, run_id, exc)
