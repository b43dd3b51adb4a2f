"""Scenario 7: how long the run page header lags the backend's STARTED, ours vs DefaultRunLauncher.

Both `dagster dev` stacks run at once on the example project (as in scenario 2). Each run is
launched as a user does, from the Launchpad (the browser lands on the run page while the run is
QUEUED), or by GraphQL followed by opening the run page; then the header's status tag is read
every 50 ms, without reloading, for ``WINDOW_S`` after the RUN_START event. The lag is the time
from RUN_START's timestamp until the header says "Started" for good (the last change to it in
the window); a header not "Started" at the end counts as ``WINDOW_S``.

What it shows (docs/benchmarks.md, "UI header"): the websocket brings RUN_START and the header turns
"Started" at once, but the RunGroupPanelQuery the UI sends on that status change can still read
STARTING (Dagster stores the event before the run's status row), writes it back into the page's
cache, and the header says "Starting" until that query's next 15 s poll. Both launchers alike.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from dagster import DagsterEventType, DagsterInstance
from playwright.sync_api import Page, sync_playwright

from benchmarks.harness import Context
from benchmarks.stats import Row
from benchmarks.ui_terminate import TERMINATE, graphql, launch, start_stacks, status
from dagster_taskiq_cancel.dev import DevStack
from dagster_taskiq_cancel_tests.stack import wait_for

CHROMIUM = "/usr/bin/chromium"
WINDOW_S = 20.0
# The header's status tag: the text of a leaf element in the top bar of the run page.
HEADER_STATUS = """() => [...document.querySelectorAll('*')].filter(e => e.children.length === 0
  && e.getBoundingClientRect().top < 60 && e.getBoundingClientRect().height > 0
  && ['Queued', 'Starting', 'Started', 'Canceling', 'Canceled'].includes(e.textContent.trim())
).map(e => e.textContent.trim()).join()"""
JOB_URL = "/locations/example_project/jobs/long_job/playground"


@contextmanager
def browser_page() -> Iterator[Page]:
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--disable-gpu", "--no-first-run"]
        )
        try:
            yield browser.new_page(viewport={"width": 1400, "height": 900})
        finally:
            browser.close()


def launch_in_ui(page: Page, stack: DevStack) -> str:
    page.goto(f"{stack.ui_url}{JOB_URL}")
    button = page.get_by_role("button", name=re.compile(r"Launch Run$"))
    button.wait_for(state="visible", timeout=60_000)
    wait_for(button.is_enabled, 60, "Launch Run enabled", interval=0.1)
    button.click()
    page.wait_for_url(re.compile(r"/runs/[0-9a-f-]{36}"), timeout=60_000)
    return page.url.rsplit("/runs/", 1)[1].split("?")[0]


def run_start_time(instance: DagsterInstance, run_id: str) -> float | None:
    records = instance.get_records_for_run(
        run_id, of_type=DagsterEventType.RUN_START, limit=1
    ).records
    return records[0].event_log_entry.timestamp if records else None


def header_lag(page: Page, stack: DevStack, instance: DagsterInstance, via: str) -> dict[str, Any]:
    """Launch one long_job run and time RUN_START → header "Started"; then terminate it."""
    if via == "launchpad":
        run_id = launch_in_ui(page, stack)
    else:
        run_id = launch(stack)
        page.goto(f"{stack.ui_url}/runs/{run_id}")
    opened = time.time()
    started = wait_for(lambda: run_start_time(instance, run_id), 180, f"{run_id} RUN_START")
    settled = None  # when the header last turned "Started"
    flips = 0  # "Started", then back to something else
    shown = ""
    while time.time() < started + WINDOW_S:
        now, header = time.time(), page.evaluate(HEADER_STATUS)
        if header == "Started" and shown != "Started":
            settled = now
        elif header != "Started" and shown == "Started":
            flips, settled = flips + 1, None
        shown = header
        time.sleep(0.05)
    lag = (settled - started) if settled else WINDOW_S
    outcome = graphql(stack, TERMINATE, ids=[run_id])["terminateRuns"]
    assert "TerminateRunSuccess" in str(outcome), outcome
    wait_for(lambda: status(stack, run_id) == "CANCELED", 120, f"run {run_id} CANCELED")
    return {
        "run_id": run_id,
        "via": via,
        "lag_s": round(lag, 3),
        "flips": flips,
        "page_opened_before_start_s": round(started - opened, 3),
    }


def run(ctx: Context) -> list[Row]:
    ours, default = start_stacks(ctx)
    results: dict[str, list[dict[str, Any]]] = {"ours": [], "default": []}
    try:
        for stack in (ours, default):
            stack.start()
        instances = {
            "ours": DagsterInstance.from_config(str(ours.home)),
            "default": DagsterInstance.from_config(str(default.home)),
        }
        with browser_page() as page:
            for index in range(ctx.size.ui_pairs * 2):
                via = "launchpad" if index % 2 == 0 else "graphql"
                pair = [("ours", ours), ("default", default)]
                for name, stack in pair if index % 2 == 0 else reversed(pair):
                    sample = header_lag(page, stack, instances[name], via)
                    results[name].append(sample)
                    print(name, sample, flush=True)
    finally:
        for stack in (ours, default):
            stack.stop()
    lagging = {name: sum(s["lag_s"] > 3 for s in samples) for name, samples in results.items()}
    flips = {name: sum(s["flips"] > 0 for s in samples) for name, samples in results.items()}
    return [
        Row(
            "7 UI header",
            "RUN_START → header Started [s]",
            [s["lag_s"] for s in results["ours"]],
            "DefaultRunLauncher",
            [s["lag_s"] for s in results["default"]],
            f"runs lagging > 3 s: ours {lagging['ours']}/{len(results['ours'])}, "
            f"default {lagging['default']}/{len(results['default'])}; "
            f"turned back to Starting: ours {flips['ours']}, default {flips['default']}",
        )
    ]
