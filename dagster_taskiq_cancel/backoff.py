"""Waits between the tries of a failed call, with jitter.

After an outage (SQS or the run storage gone for a minute) every worker of a fleet fails at the
same moment; with a fixed doubling they would all retry in lockstep, a burst each time. Each
wait is drawn at random ("decorrelated jitter"): between ``start`` and three times the last
wait, capped at ``cap``. Never below ``start``, so a retry loop never spins.
"""

from __future__ import annotations

import random


class Backoff:
    """The waits of one retry loop: ``next()`` before each new try."""

    def __init__(self, start: float, cap: float, rng: random.Random | None = None) -> None:
        if not 0 < start <= cap:
            raise ValueError(f"backoff needs 0 < start <= cap, got start={start}, cap={cap}")
        self.start = start
        self.cap = cap
        self._last = start
        self._rng = rng or random.Random()

    def next(self) -> float:
        """The wait before the next try, in seconds: in [start, cap]."""
        self._last = min(self.cap, self._rng.uniform(self.start, self._last * 3))
        return self._last
