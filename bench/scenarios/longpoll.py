"""Scenario: long-poll. 10,000 polls wait at once on one api process (`x-ferry-wait: 60`) for
jobs that no worker runs yet; then workers start and the jobs end. Memory per waiting poll is
the api's resident set with the polls waiting minus before, over the count; the delay from a
job's end to its poll's answer is the poll client's clock at the answer minus the job's
`completed_at` (PostgreSQL's now() at the finishing transaction's start; same machine)."""

from __future__ import annotations

import asyncio
import time

import aiohttp

from bench.context import Bench
from bench.procs import BenchError, progress, rss_mib
from bench.report import fmt_ms, pct_ms
from bench.scenarios.jobs import _submit, _wait
from bench.stack import ferry_headers

WAIT_S = 60


async def run_longpoll(b: Bench) -> None:
    scenario = "long-poll"
    count = 2000 if b.quick else 10_000
    b.stack.stop_workers()
    await b.reset()
    submitted = (await _submit(b, scenario, "job", count)).ok
    ids = await b.db.job_ids()
    if len(ids) != submitted:
        raise BenchError(f"{submitted} submits answered, {len(ids)} job rows")
    await b.settle()
    api_pid = b.procs.get("api").pid
    before = rss_mib(api_pid) or 0.0
    answered: dict[str, tuple[float, str]] = {}
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=WAIT_S + 120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:

        async def poll(job_id: str) -> None:
            headers = {**ferry_headers(), "x-bf-async-id": job_id, "x-ferry-wait": str(WAIT_S)}
            async with http.post(f"{b.stack.api_url}/anthropic/v1/messages", data=b"{}",
                                 headers=headers) as response:
                await response.read()
                answered[job_id] = (time.time(), response.headers.get("x-bf-async-status", ""))

        progress(f"{scenario}: opening {len(ids)} waiting polls")
        opened = time.monotonic()
        polls = [asyncio.create_task(poll(f"job_{job_id.hex}")) for job_id in ids]
        waiting = await _wait_for_waiters(b, len(ids), polls)
        during = rss_mib(api_pid) or 0.0
        open_s = time.monotonic() - opened
        progress(f"{scenario}: {waiting} polls waiting after {open_s:.1f} s; api RSS "
                 f"{before:.0f} → {during:.0f} MiB; starting 2 workers")
        await b.stack.start_workers(2, wait_interactive=False)
        await _wait(b, len(ids), timeout_s=300)
        await asyncio.wait_for(asyncio.gather(*polls), WAIT_S + 60)
    await b.stack.clear_fake_calls()
    b.stack.stop_workers()
    ended = {f"job_{job_id.hex}": t for job_id, t in (await b.db.completion_times()).items()}
    delays = sorted(answered[j][0] - ended[j] for j in answered if j in ended)
    statuses = [status for _, status in answered.values()]
    completed = statuses.count("completed")
    load = (f"{len(ids)} polls waiting on 1 api process, then 2 workers finishing the jobs "
            "(upstream 0 ms)")
    per_waiter_kib = (during - before) * 1024 / max(waiting, 1)
    b.report.figure(scenario, "api memory per waiting poll", f"{per_waiter_kib:.1f} KiB",
                    load, f"{open_s:.1f} s to open", f"api VmRSS {before:.0f} MiB before, "
                    f"{during:.0f} MiB with {waiting} polls waiting (ferry_long_polls_waiting)")
    b.report.figure(scenario, "job end → poll answered p50 / p99 / max",
                    f"{fmt_ms(pct_ms(delays, 50))} / {fmt_ms(pct_ms(delays, 99))} / "
                    f"{fmt_ms(delays[-1] * 1000 if delays else None)} ms", load, "",
                    "poll client's time.time() at the answer − the job's completed_at; "
                    f"{completed} of {len(ids)} answered completed, "
                    f"{len(ids) - completed} otherwise")
    if completed != len(ids):
        b.report.note(f"long-poll: {len(ids) - completed} polls did not answer completed: "
                      f"{sorted(set(statuses))}")


async def _wait_for_waiters(b: Bench, count: int, polls: list[asyncio.Task[None]]) -> int:
    """Until the api says every poll is waiting (its metrics port), or 60 s."""
    deadline = time.monotonic() + 60
    waiting = 0
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            failed = [p for p in polls if p.done() and p.exception() is not None]
            if failed:
                raise BenchError(f"{len(failed)} polls failed: {failed[0].exception()!r}")
            async with http.get(f"{b.stack.api_metrics_url}/metrics") as response:
                for line in (await response.text()).splitlines():
                    if line.startswith("ferry_long_polls_waiting "):
                        waiting = int(float(line.split()[1]))
            if waiting >= count:
                break
            progress(f"  {waiting} polls waiting")
            await asyncio.sleep(2)
    return waiting

