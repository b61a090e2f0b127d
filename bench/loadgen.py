"""One load-generator process: `python -m bench.loadgen '<spec json>'` prints one JSON line.

Open loop: request i is due at `start_at + offset + i / rate` whatever happened to the earlier
ones, and its latency is measured from that intended time. A server that stalls cannot then
hide the queue it built (coordinated omission): the requests it delayed count with their full
wait. Closed loop: `connections` clients each send the next request when their last one
finished; it finds the maximum rate, not the latency at a given rate.

Plain requests go through `bench.lean` (a few times cheaper than aiohttp's client, which the
generator shares the machine with what it measures); streams through aiohttp's client.

Latencies go into HdrHistograms (microseconds, 3 significant digits), encoded in the result so
the parent adds up the histograms of several generator processes exactly. Times are read from
`time.monotonic()`, not the event loop's clock: uvloop's `loop.time()` is libuv's cached
`uv_now`, in whole milliseconds and as of the start of the loop's current iteration, which
made every latency a multiple of 1 ms (offset by the intended send time) and a little early.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import uvloop
from hdrh.histogram import HdrHistogram

from bench.lean import HTTPFailure, LeanClient, retry_after_seconds

LOWEST_US, HIGHEST_US, DIGITS = 1, 3_600_000_000, 3
now = time.monotonic  # the clock of every time here (see above)


def new_histogram() -> HdrHistogram:
    return HdrHistogram(LOWEST_US, HIGHEST_US, DIGITS)


@dataclass(frozen=True)
class Spec:
    url: str
    body: str
    headers: dict[str, str]
    mode: str  # "open" | "closed"
    start_at: float  # wall clock (time.time()) of the first send, shared by all processes
    duration: float = 0.0  # measured window, after the warm-up
    warmup: float = 0.0
    rate: float = 0.0  # open loop: this process's share
    offset: float = 0.0  # open loop: phase of this process in the combined schedule
    connections: int = 64  # closed loop: clients; open loop: connection pool limit
    total: int | None = None  # closed loop: stop after this many requests instead of a time
    stream: bool = False
    timeout: float = 60.0
    expect_status: int = 200
    samples: bool = False  # also return (intended wall time, latency µs) of each success


@dataclass
class Tally:
    latency: HdrHistogram = field(default_factory=new_histogram)
    first_event: HdrHistogram = field(default_factory=new_histogram)
    lag: HdrHistogram = field(default_factory=new_histogram)
    refused: HdrHistogram = field(default_factory=new_histogram)  # 529s, from intended send
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    first_send: float | None = None  # monotonic, of recorded requests
    last_done: float | None = None
    samples: list[tuple[float, int]] = field(default_factory=list)  # (monotonic, µs)

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def success(self, sent: float, done: float, latency_s: float,
                first_event_s: float | None) -> None:
        self.ok += 1
        self.latency.record_value(max(1, round(latency_s * 1e6)))
        self.samples.append((sent, max(1, round(latency_s * 1e6))))
        if first_event_s is not None:
            self.first_event.record_value(max(1, round(first_event_s * 1e6)))
        self.first_send = sent if self.first_send is None else min(self.first_send, sent)
        self.last_done = done if self.last_done is None else max(self.last_done, done)


Answer = tuple[str | None, float, float | None, float | None]


class Sender:
    """Sends the spec's request: (error kind or None, completion time, time of the first
    `event:` line, the retry-after of a refusal)."""

    def __init__(self, spec: Spec, session: aiohttp.ClientSession) -> None:
        self._spec = spec
        self._session = session
        self._body = spec.body.encode()
        self._lean = None if spec.stream else LeanClient(
            spec.url, self._body, spec.headers, spec.connections, spec.timeout)

    async def __call__(self) -> Answer:
        if self._lean is None:
            return await _request(self._session, self._spec, self._body)
        try:
            status, retry_after = await self._lean.post()
        except (TimeoutError, HTTPFailure, OSError) as exc:
            return (str(exc) if isinstance(exc, HTTPFailure) else type(exc).__name__,
                    now(), None, None)
        error = None if status == self._spec.expect_status else f"http_{status}"
        return error, now(), None, retry_after

    def close(self) -> None:
        if self._lean is not None:
            self._lean.close()


async def _request(session: aiohttp.ClientSession, spec: Spec, body: bytes) -> Answer:
    """What `Sender` answers, through aiohttp's client (streams)."""
    first: float | None = None
    try:
        async with session.post(spec.url, data=body, headers=spec.headers) as resp:
            if resp.status != spec.expect_status:
                await resp.read()
                retry_after = resp.headers.get("retry-after")
                return (f"http_{resp.status}", now(), None,
                        None if retry_after is None else retry_after_seconds(retry_after))
            if not spec.stream:
                await resp.read()
                return None, now(), None, None
            stopped = False
            async for line in resp.content:
                if first is None and line.startswith(b"event:"):
                    first = now()
                if line.startswith((b"event: message_stop", b"event:message_stop")):
                    stopped = True
            return (None if stopped else "incomplete_stream"), now(), first, None
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        return type(exc).__name__, now(), None, None


async def _open_loop(send: Sender, spec: Spec, tally: Tally, origin: float) -> None:
    count = int((spec.warmup + spec.duration) * spec.rate)
    measured_from = origin + spec.warmup
    tasks: set[asyncio.Task[None]] = set()

    async def one(intended: float) -> None:
        start = now()
        error, done, first, _ = await send()
        if intended < measured_from:
            return
        tally.lag.record_value(max(1, round((start - intended) * 1e6)))
        if error:
            tally.error(error)
            if error == "http_529":
                tally.refused.record_value(max(1, round((done - intended) * 1e6)))
        else:
            tally.success(intended, done, done - intended,
                          None if first is None else first - intended)

    for i in range(count):
        intended = origin + spec.offset + i / spec.rate
        delay = intended - now()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(intended))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    while tasks:
        await asyncio.wait(set(tasks))


async def _closed_loop(send: Sender, spec: Spec, tally: Tally, origin: float) -> None:
    measured_from = origin + spec.warmup
    end = None if spec.total is not None else measured_from + spec.duration
    remaining = [spec.total]

    def more() -> bool:
        if remaining[0] is not None:
            if remaining[0] <= 0:
                return False
            remaining[0] -= 1
            return True
        return now() < end  # type: ignore[operator]

    async def client() -> None:
        while more():
            start = now()
            error, done, first, retry_after = await send()
            if retry_after is not None:
                # Refused: wait as told before the next request, as the SDKs do. A client
                # that asks again at once measures how fast Ferry refuses, not what it serves.
                await asyncio.sleep(min(retry_after, end - now() if end else retry_after))
            # Time mode: only requests sent and finished inside the window count.
            if start < measured_from or (end is not None and done > end):
                continue
            if error:
                tally.error(error)
            else:
                tally.success(start, done, done - start, None if first is None else first - start)

    delay = origin - now()
    if delay > 0:
        await asyncio.sleep(delay)
    await asyncio.gather(*(client() for _ in range(spec.connections)))


async def run(spec: Spec) -> dict[str, Any]:
    origin = now() + (spec.start_at - time.time())
    tally = Tally()
    connector = aiohttp.TCPConnector(limit=spec.connections, limit_per_host=0,
                                     ttl_dns_cache=None, force_close=False)
    timeout = aiohttp.ClientTimeout(total=spec.timeout)
    cpu0 = _cpu()
    wall0 = time.monotonic()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout,
                                     auto_decompress=False) as session:
        send = Sender(spec, session)
        try:
            if spec.mode == "open":
                await _open_loop(send, spec, tally, origin)
            else:
                await _closed_loop(send, spec, tally, origin)
        finally:
            send.close()
    wall = time.monotonic() - wall0
    return {
        "ok": tally.ok,
        "errors": tally.errors,
        "latency": tally.latency.encode().decode(),
        "first_event": tally.first_event.encode().decode() if spec.stream else None,
        "lag": tally.lag.encode().decode(),
        "refused": tally.refused.encode().decode(),
        # Wall-clock span of the recorded requests: first send (intended, in open loop) to
        # last completion. The parent takes the union over processes.
        "first_send": None if tally.first_send is None else tally.first_send - origin
                      + spec.start_at,
        "last_done": None if tally.last_done is None else tally.last_done - origin
                     + spec.start_at,
        "samples": [(t - origin + spec.start_at, us) for t, us in tally.samples]
                   if spec.samples else None,
        "cpu_s": _cpu() - cpu0,
        "wall_s": wall,
    }


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str]) -> None:
    spec = Spec(**json.loads(argv[0]))
    result = uvloop.run(run(spec))
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
