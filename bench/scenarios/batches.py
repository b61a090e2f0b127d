"""Scenario: Message Batches. One batch of 100,000 small requests: how long create takes and
what it costs the api in memory, how fast 2 workers run it, how long its JSONL results take to
stream; meanwhile single async jobs and sync requests go through their own lanes, timed
against the same on idle workers. Then one create of about 250 MB (100,000 requests of 2.5 KB
each), to show the api's memory does not grow with the body: it is read, parsed and copied
into PostgreSQL as it arrives, never held whole.

The api's peak memory is its VmHWM after `clear_refs` reset it to the resident set just
before the create; create time is the client's, from the first byte sent to the answer; batch
times come from the jobs table (PostgreSQL's now()); single-job latency is completed_at −
submitted_at of the async jobs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bench.context import Bench
from bench.procs import BenchError, peak_rss_mib, progress, rss_mib
from bench.report import fmt_ms, fmt_rate, pct_ms
from bench.stack import MODEL, async_headers, ferry_headers, sync_body

BATCHES = "/anthropic/v1/messages/batches"
LARGE_PAD = 2400  # bytes of prompt per request in the large create: ~250 MB for 100,000
SINGLES = 200  # single async jobs, and sync requests, sent during the batch (and when idle)
SINGLES_RATE = 20.0  # per second


def _body(count: int, pad: int) -> bytes:
    text = "Summarise this. " + "x" * pad
    requests = [{"custom_id": f"r-{i}", "params": {
        "model": MODEL, "max_tokens": 32, "messages": [{"role": "user", "content": text}]}}
        for i in range(count)]
    return orjson.dumps({"requests": requests})


def _reset_peak(pid: int) -> None:
    """Reset the process's VmHWM to its current resident set (Linux `clear_refs` 5)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


async def _create(b: Bench, http: aiohttp.ClientSession, body: bytes
                  ) -> tuple[dict[str, object], float, float, float]:
    """(batch, seconds to the answer, api MiB before, api peak MiB during)."""
    api_pid = b.procs.get("api").pid
    _reset_peak(api_pid)
    before = rss_mib(api_pid) or 0.0
    started = time.monotonic()
    async with http.post(f"{b.stack.api_url}{BATCHES}", data=body,
                         headers=ferry_headers()) as response:
        answer = await response.read()
        if response.status != 200:
            raise BenchError(f"batch create answered {response.status}: {answer[:300]!r}")
    seconds = time.monotonic() - started
    peak = peak_rss_mib(api_pid) or 0.0
    return orjson.loads(answer), seconds, before, peak


async def _batch(http: aiohttp.ClientSession, b: Bench, batch_id: str) -> dict[str, object]:
    async with http.get(f"{b.stack.api_url}{BATCHES}/{batch_id}",
                        headers=ferry_headers()) as response:
        result: dict[str, object] = orjson.loads(await response.read())
        return result


async def _wait_ended(http: aiohttp.ClientSession, b: Bench, batch_id: str,
                      timeout_s: float) -> dict[str, object]:
    deadline = time.monotonic() + timeout_s
    while True:
        batch = await _batch(http, b, batch_id)
        if batch["processing_status"] == "ended":
            return batch
        if time.monotonic() > deadline:
            raise BenchError(f"batch {batch_id} not ended after {timeout_s:g} s: "
                             f"{batch['request_counts']}")
        await asyncio.sleep(1.0)


async def _singles(b: Bench, http: aiohttp.ClientSession, label: str) -> list[float]:
    """Submit SINGLES async jobs at SINGLES_RATE/s; once all have ended, their
    completed_at − submitted_at in seconds, sorted."""
    ids: list[str] = []

    async def submit(i: int) -> None:
        async with http.post(f"{b.stack.api_url}/anthropic/v1/messages",
                             data=sync_body(f"single {label} {i}"),
                             headers=async_headers()) as response:
            data = orjson.loads(await response.read())
            if response.status != 200:
                raise BenchError(f"single async submit answered {response.status}: {data}")
            ids.append(data["id"])

    await _paced(submit)
    deadline = time.monotonic() + 120
    while True:
        latencies = await b.db.async_latencies()
        if len(latencies) >= SINGLES or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    if len(latencies) < SINGLES:
        raise BenchError(f"only {len(latencies)} of {SINGLES} single async jobs ended")
    return latencies


async def _syncs(b: Bench, http: aiohttp.ClientSession,
                 label: str) -> tuple[list[float], int]:
    """SINGLES sync requests at SINGLES_RATE/s: the client-side latency in seconds of each one
    served, sorted, and how many the admission control refused (529: on a machine the batch
    saturates, the api's own event loop can fall behind its target)."""
    latencies: list[float] = []
    refused = [0]

    async def send(i: int) -> None:
        started = time.monotonic()
        async with http.post(f"{b.stack.api_url}/anthropic/v1/messages",
                             data=sync_body(f"sync {label} {i}"),
                             headers=ferry_headers()) as response:
            await response.read()
            if response.status == 529:
                refused[0] += 1
                return
            if response.status != 200:
                raise BenchError(f"a sync request answered {response.status}")
        latencies.append(time.monotonic() - started)

    await _paced(send)
    return sorted(latencies), refused[0]


async def _paced(send: Callable[[int], Coroutine[Any, Any, None]]) -> None:
    """`send(i)` for SINGLES values of i, one every 1/SINGLES_RATE s; until all have ended."""
    tasks: list[asyncio.Task[None]] = []
    for i in range(SINGLES):
        tasks.append(asyncio.create_task(send(i)))
        await asyncio.sleep(1 / SINGLES_RATE)
    await asyncio.gather(*tasks)


async def run_batches(b: Bench) -> None:
    scenario = "batches"
    count = 10_000 if b.quick else 100_000
    b.stack.stop_workers()
    await b.reset()
    await b.settle()
    timeout = aiohttp.ClientTimeout(total=1800)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        # Single async jobs on idle workers: the baseline.
        await b.stack.start_workers(2)
        progress(f"{scenario}: {SINGLES} single async jobs and sync requests on idle workers")
        idle, (idle_sync, idle_refused) = await asyncio.gather(_singles(b, http, "idle"),
                                                               _syncs(b, http, "idle"))
        b.stack.stop_workers()
        await b.reset()

        body = _body(count, 0)
        each = len(body) // count
        progress(f"{scenario}: creating a batch of {count} requests "
                 f"({len(body) / 2**20:.1f} MiB) with no worker running")
        batch, create_s, before, peak = await _create(b, http, body)
        del body
        load = f"{count} requests of ~{each} bytes, 1 api, 2 workers, upstream 0 ms"
        b.report.figure(scenario, "create: seconds to the answer",
                        f"{create_s:.2f} s", load, "", "client clock, first byte to answer: "
                        "read, parse, COPY into jobs, commit")
        b.report.figure(scenario, "create: api peak memory over its resident set",
                        f"+{max(peak - before, 0):.0f} MiB", load, "",
                        f"api VmHWM (reset before) {peak:.0f} MiB vs VmRSS {before:.0f} MiB")

        progress(f"{scenario}: starting 2 workers; {SINGLES} single async jobs and sync "
                 "requests meanwhile")
        started = time.monotonic()
        await b.stack.start_workers(2)
        await asyncio.sleep(3)  # the batch lane busy before the single jobs arrive
        during, (during_sync, during_refused) = await asyncio.gather(
            _singles(b, http, "during"), _syncs(b, http, "during"))
        ended = await _wait_ended(http, b, str(batch["id"]), timeout_s=1500)
        wall = time.monotonic() - started
        span = await b.db.batch_span()
        counts = ended["request_counts"]
        b.report.figure(scenario, "batch requests/s, 2 workers",
                        f"{fmt_rate(span.count / max(span.seconds, 1e-9))}/s", load,
                        f"{span.seconds:.1f} s",
                        f"succeeded requests / (last completed_at − first started_at); "
                        f"counts {counts}; workers started → ended seen: {wall:.0f} s")
        b.report.figure(scenario, "single async job latency p50 / p99: idle vs during batch",
                        f"{fmt_ms(pct_ms(idle, 50))} / {fmt_ms(pct_ms(idle, 99))} ms vs "
                        f"{fmt_ms(pct_ms(during, 50))} / {fmt_ms(pct_ms(during, 99))} ms",
                        f"{SINGLES} async jobs at {SINGLES_RATE:g}/s", "",
                        "completed_at − submitted_at; the batch runs on its own lane "
                        "(FERRY_BATCH_CONCURRENCY per worker)")
        b.report.figure(scenario, "sync request latency p50 / p99: idle vs during batch",
                        f"{fmt_ms(pct_ms(idle_sync, 50))} / {fmt_ms(pct_ms(idle_sync, 99))} ms vs "
                        f"{fmt_ms(pct_ms(during_sync, 50))} / {fmt_ms(pct_ms(during_sync, 99))} ms"
                        f"; refused with 529: {idle_refused} vs {during_refused}",
                        f"{SINGLES} sync requests at {SINGLES_RATE:g}/s beside the async jobs",
                        "", "client clock, send to answer (of the requests served)")

        results_started = time.monotonic()
        lines = 0
        async with http.get(str(ended["results_url"]), headers=ferry_headers()) as response:
            if response.status != 200:
                raise BenchError(f"results answered {response.status}")
            async for line in response.content:
                lines += bool(line.strip())
        results_s = time.monotonic() - results_started
        b.report.figure(scenario, "results: JSONL lines/s streamed",
                        f"{fmt_rate(lines / max(results_s, 1e-9))}/s", load,
                        f"{results_s:.2f} s", f"{lines} lines read by the client")
        if lines != count:
            b.report.note(f"batches: {lines} result lines for {count} requests")

        b.stack.stop_workers()
        await b.reset()
        await b.settle()
        body = _body(count, LARGE_PAD)
        size = len(body) / 2**20
        progress(f"{scenario}: creating a batch of {count} requests ({size:.0f} MiB)")
        large, large_s, large_before, large_peak = await _create(b, http, body)
        del body
        b.report.figure(scenario, "large create: seconds / api peak memory over resident",
                        f"{large_s:.1f} s / +{max(large_peak - large_before, 0):.0f} MiB",
                        f"{count} requests, {size:.0f} MiB body, no worker running", "",
                        f"api VmHWM (reset before) {large_peak:.0f} MiB vs VmRSS "
                        f"{large_before:.0f} MiB: the body is never held whole")
        async with http.post(f"{b.stack.api_url}{BATCHES}/{large['id']}/cancel",
                             headers=ferry_headers()) as response:
            await response.read()
    await b.stack.purge_queues()
    await b.reset()
