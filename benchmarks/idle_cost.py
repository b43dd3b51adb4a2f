"""Scenario 3: SQS requests per idle worker per minute, counted at the server.

Both workers idle side by side on their own queues while moto's request recorder is on; each
recorded request is attributed by the queue name in its body or URL. Ours is the real
``dagster-taskiq-cancel worker`` (main and cancels queues); the peer a plain taskiq-aio-sqs
worker with default settings.
"""

from __future__ import annotations

import base64
import collections
import json
import time
import urllib.request

from benchmarks import trivial_worker
from benchmarks.dispatch import create_queues
from benchmarks.harness import Context
from benchmarks.stats import Row
from dagster_taskiq_cancel_tests.stack import Deployment, stop_process


def recorder(endpoint: str, action: str) -> str:
    """Call moto's recorder API (start-recording, stop-recording, reset-recording, download)."""
    method = "GET" if action.startswith("download") else "POST"
    request = urllib.request.Request(f"{endpoint}/moto-api/recorder/{action}", method=method)
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.read().decode()


def count_requests(recording: str, names: dict[str, str]) -> dict[str, collections.Counter[str]]:
    """Per label in ``names`` (label → queue-name prefix): recorded requests by SQS action."""
    counts: dict[str, collections.Counter[str]] = {label: collections.Counter() for label in names}
    for line in filter(None, recording.splitlines()):
        entry = json.loads(line)
        body = entry.get("body") or ""
        if entry.get("body_encoded"):
            body = base64.b64decode(body).decode(errors="replace")
        text = f"{entry.get('url', '')} {body}"
        action = entry.get("headers", {}).get("X-Amz-Target", "?").rsplit(".", 1)[-1]
        for label, prefix in names.items():
            if prefix in text:
                counts[label][action] += 1
    return counts


def run(ctx: Context) -> list[Row]:
    if ctx.sqs_kind != "moto":
        return [Row("3 idle cost", "skipped", [], note="counts requests with moto's recorder")]
    window = ctx.size.idle_window_s
    deployment = Deployment(ctx.scratch("idle"), ctx.endpoint_url)
    plain_queue = create_queues(ctx.endpoint_url, "plainidle")
    plain = None
    try:
        deployment.start_worker()
        plain, _ = trivial_worker.spawn("plain", plain_queue, ctx.endpoint_url, ctx.scratch("idle"))
        recorder(ctx.endpoint_url, "reset-recording")
        recorder(ctx.endpoint_url, "start-recording")
        time.sleep(window)  # the measurement itself: both workers idle for the window
        recorder(ctx.endpoint_url, "stop-recording")
        recording = recorder(ctx.endpoint_url, "download-recording")
    finally:
        if plain is not None:
            stop_process(plain)
        deployment.stop()
    counts = count_requests(
        recording, {"ours": deployment.settings.queue_name, "plain": plain_queue}
    )
    per_minute = {label: sum(c.values()) * 60 / window for label, c in counts.items()}
    return [
        Row(
            "3 idle cost",
            "SQS requests / idle worker / min",
            [per_minute["ours"]],
            "taskiq-aio-sqs",
            [per_minute["plain"]],
            note=f"one {window:.0f} s window, both idle at once; by action: "
            f"ours {dict(counts['ours'])}, taskiq-aio-sqs {dict(counts['plain'])}",
        )
    ]
