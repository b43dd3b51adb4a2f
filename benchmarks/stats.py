"""Rows of the results table and the one percentile implementation they all use."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field


def percentile(samples: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0-100), interpolated between closest ranks ("inclusive")."""
    if not samples:
        raise ValueError("no samples")
    if len(samples) == 1:
        return float(samples[0])
    if p >= 100:
        return float(max(samples))
    if p <= 0:
        return float(min(samples))
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return cuts[round(p) - 1]


@dataclass
class Row:
    """One line of the table: our figure for a metric and, where there is one, the peer's."""

    scenario: str
    metric: str
    samples: list[float]
    peer: str = ""
    peer_samples: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def n(self) -> int:
        return len(self.samples)

    def stat(self, p: float) -> float | None:
        return percentile(self.samples, p) if self.samples else None

    @property
    def peer_median(self) -> float | None:
        return percentile(self.peer_samples, 50) if self.peer_samples else None

    @property
    def ratio(self) -> float | None:
        """Ours over the peer's, median to median: below 1 means we are faster or cheaper."""
        ours, theirs = self.stat(50), self.peer_median
        if ours is None or not theirs:
            return None
        return ours / theirs

    def summary(self) -> dict[str, object]:
        return {
            "scenario": self.scenario,
            "metric": self.metric,
            "n": self.n,
            "median": self.stat(50),
            "p90": self.stat(90),
            "p99": self.stat(99),
            "max": self.stat(100),
            "peer": self.peer,
            "peer_n": len(self.peer_samples),
            "peer_median": self.peer_median,
            "ratio": self.ratio,
            "note": self.note,
            "samples": self.samples,
            "peer_samples": self.peer_samples,
        }


def pairwise_ratio_row(
    scenario: str, metric: str, ours: Sequence[float], theirs: Sequence[float], peer: str
) -> Row:
    """A row whose note adds the median of the pair-by-pair ratios (pairs run back to back)."""
    ratios = [a / b for a, b in zip(ours, theirs, strict=True) if b]
    note = f"pairwise ratio median {percentile(ratios, 50):.2f}" if ratios else ""
    return Row(scenario, metric, list(ours), peer, list(theirs), note)
