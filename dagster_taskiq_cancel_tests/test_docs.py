"""The documentation says what the code does: generated pages, the tour, links, rule numbers."""

from __future__ import annotations

import re
from pathlib import Path

from dagster_taskiq_cancel.reference import PAGE, REGENERATE, render
from dagster_taskiq_cancel_tests.tour import README, STEPS, readme_tour_labels

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
LINK = re.compile(r"\]\(([^)#\s]+)(#[^)\s]*)?\)")
RULE_CITED = re.compile(r"DESIGN rule\s+(\d+)")
RULE_HEADING = re.compile(r"^(\d+)\. \*\*", re.MULTILINE)


def test_configuration_page_is_generated_from_the_settings_class() -> None:
    page = (REPO / PAGE).read_text()
    assert page == render(), f"{PAGE} is out of date: run `{REGENERATE}`"


def test_readme_tour_names_what_the_ui_test_clicks() -> None:
    assert readme_tour_labels() == [label for _, label in STEPS], (
        "the README's tour and test_ui.py's clicks differ: the tour's bold texts, in order, "
        "must be tour.STEPS"
    )


def test_readme_starts_with_the_two_commands_and_stays_short() -> None:
    text = README.read_text()
    first_block = text.split("```")[1]
    assert [line.split()[:2] for line in first_block.strip().splitlines()] == [
        ["make", "dev"],
        ["make", "test"],
    ]
    assert len(text.splitlines()) <= 160


def anchors(page: Path) -> set[str]:
    """GitHub's anchors for the page's headings."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_every_relative_link_in_the_docs_resolves() -> None:
    for page in [README, REPO / "CHANGELOG.md", *DOCS.glob("*.md")]:
        for target, anchor in LINK.findall(page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            linked = page.parent / target
            assert linked.exists(), f"{page.name} links to missing {target}"
            if anchor and linked.suffix == ".md":
                assert anchor[1:] in anchors(linked), f"{page.name} links to {target}{anchor}"


def test_every_design_rule_the_code_cites_is_in_the_architecture_page() -> None:
    rules = {int(n) for n in RULE_HEADING.findall((DOCS / "architecture.md").read_text())}
    for path in [*REPO.glob("dagster_taskiq_cancel/**/*.py"), *REPO.glob("*_tests/*.py")]:
        for cited in RULE_CITED.findall(path.read_text()):
            assert int(cited) in rules, f"{path.name} cites DESIGN rule {cited}"


def test_docs_index_has_the_integration_front_matter() -> None:
    head = (DOCS / "index.md").read_text().split("---")[1]
    keys = {line.split(":")[0] for line in head.strip().splitlines() if ":" in line}
    assert {"title", "description", "source", "pypi", "tags"} <= keys
