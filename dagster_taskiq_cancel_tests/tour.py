"""The README's five-minute tour as the browser test performs it.

The tour writes in bold exactly what a user clicks or waits for, in order; ``STEPS`` is that
list as the UI test acts on it, and ``readme_tour_labels`` reads it back from the README, so a
test fails when the two drift apart.
"""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
TOUR_HEADING = "## A five-minute tour"
# (what the browser does, the text it acts on): "link"/"button" are clicked, "status" is waited
# for in the run page's header.
STEPS: tuple[tuple[str, str], ...] = (
    ("link", "Jobs"),
    ("link", "long_job"),
    ("button", "Materialize"),
    ("link", "View"),
    ("status", "Started"),
    ("button", "Terminate"),
    ("button", "Terminate 1 run"),
    ("status", "Canceled"),
)
BOLD = re.compile(r"\*\*(.+?)\*\*")


def tour_section(readme: str) -> str:
    """The tour's text: from its heading to the next heading of the same level."""
    start = readme.index(TOUR_HEADING) + len(TOUR_HEADING)
    end = readme.find("\n## ", start)
    return readme[start : end if end != -1 else len(readme)]


def readme_tour_labels(path: Path = README) -> list[str]:
    """Every bold text of the README's tour, in order."""
    return BOLD.findall(tour_section(path.read_text()))
