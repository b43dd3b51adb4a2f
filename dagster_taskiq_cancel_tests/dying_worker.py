"""``python -m dagster_taskiq_cancel_tests.dying_worker worker ...``: a real worker, except that its
loop named by ``DYING_LOOP`` (``listen``, ``poll_loop`` or ``cancel_loop``) raises as soon as the
file ``DYING_TRIGGER`` exists.

No message can end one of our loops any more (each is set aside), so the test of what a dead loop
does to its worker injects the death here, in a real worker process on a real SQS server.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncGenerator, Callable, Coroutine
from pathlib import Path
from typing import Any

from dagster_taskiq_cancel.broker import CancellableSqsBroker
from dagster_taskiq_cancel.cli import main
from dagster_taskiq_cancel.worker.worker import Worker

TRIGGER = Path(os.environ["DYING_TRIGGER"])
Loop = Callable[[Any], Coroutine[Any, Any, None]]


async def _die_on_trigger() -> None:
    while not TRIGGER.exists():
        await asyncio.sleep(0.05)
    raise RuntimeError(f"injected failure: {TRIGGER} exists")


def _dying(loop: Loop) -> Loop:
    async def run(self: Any) -> None:
        running = asyncio.ensure_future(loop(self))
        try:
            await _die_on_trigger()
        finally:
            running.cancel()

    return run


def _dying_listen(listen: Callable[[Any], AsyncGenerator[Any, None]]) -> Any:
    async def run(self: Any) -> AsyncGenerator[Any, None]:
        messages = listen(self)
        dying = asyncio.ensure_future(_die_on_trigger())
        while True:
            received = asyncio.ensure_future(anext(messages))
            await asyncio.wait({received, dying}, return_when=asyncio.FIRST_COMPLETED)
            if dying.done():
                received.cancel()
                dying.result()
            yield received.result()

    return run


if __name__ == "__main__":
    name = os.environ["DYING_LOOP"]
    if name == "listen":
        CancellableSqsBroker.listen = _dying_listen(CancellableSqsBroker.listen)  # type: ignore[method-assign]
    else:
        setattr(Worker, name, _dying(getattr(Worker, name)))
    main()
