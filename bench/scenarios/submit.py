"""Scenario 3: durable async submits (row inserted, message confirmed by the broker, row
committed) at saturation, against a bare aiohttp handler on the same machine as the ceiling."""

from __future__ import annotations

from bench.context import Bench
from bench.load import Target
from bench.report import fmt_rate
from bench.stack import async_headers, sync_body

CONNECTIONS = 64
FIXED_RATE = 200

CLOSED_HOW = "closed-loop, max completed/s; latency from actual send; no workers running"
OPEN_HOW = "open-loop, latency from intended send time; no workers running"


def ferry_submit(b: Bench) -> Target:
    return Target("ferry async submit", f"{b.stack.api_url}/anthropic/v1/messages",
                  sync_body(), async_headers())


async def run_submit(b: Bench) -> None:
    scenario = "3 async submit"
    # Workers stay stopped: the figure is the front door's, not shared with job execution.
    b.stack.stop_workers()
    await b.reset()
    await b.stack.start_bare()
    try:
        bare = Target("bare aiohttp", f"{b.stack.bare_url}/anthropic/v1/messages", sync_body(),
                      async_headers())
        ferry = await b.closed(scenario, ferry_submit(b), CONNECTIONS, CLOSED_HOW,
                               profile=("api",))
        await b.settle()
        ceiling = await b.closed(scenario, bare, CONNECTIONS, CLOSED_HOW)
        await b.settle()
    finally:
        b.stack.stop_bare()
    counts = await b.db.status_counts()
    for result in (ferry, ceiling):
        b.report.figure(scenario, f"submits/s, {result.target}",
                        f"{fmt_rate(result.achieved_rps)}/s", result.describe_load(),
                        f"{result.duration:g} s", "completed 200s / measured window")
    if ceiling.achieved_rps:
        ratio = ferry.achieved_rps / ceiling.achieved_rps
        b.report.figure(scenario, "Ferry / bare aiohttp", f"{ratio:.2f}×", ferry.describe_load(),
                        f"{ferry.duration:g} s", "ratio of the two above")
    b.report.note(f"3 async submit: {counts.get('pending', 0)} job rows pending after the "
                  f"saturation run (every 200 is a committed row; warm-up submits included).")
    await b.open(scenario, ferry_submit(b), FIXED_RATE, OPEN_HOW)
    await b.reset()
