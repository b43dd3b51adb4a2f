"""``python -m dagster_taskiq_cancel_tests.flaky_acks_worker worker ...``: a real worker whose
first ``FLAKY_ACK_FAILURES`` sends to the acks queue fail as a network error would."""

from __future__ import annotations

import os
from typing import Any

from dagster_taskiq_cancel.broker import CancellableSqsBroker
from dagster_taskiq_cancel.cli import main

_failures_left = int(os.environ["FLAKY_ACK_FAILURES"])
_send = CancellableSqsBroker.send


async def _flaky_send(self: CancellableSqsBroker, name: str, *args: Any, **kwargs: Any) -> None:
    global _failures_left
    if name == self.names.acks and _failures_left > 0:
        _failures_left -= 1
        raise OSError(f"injected send failure ({_failures_left} left)")
    await _send(self, name, *args, **kwargs)


if __name__ == "__main__":
    CancellableSqsBroker.send = _flaky_send  # type: ignore[method-assign]
    main()
