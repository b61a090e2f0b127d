"""Driving load: starts generator processes (`bench.loadgen`), merges what they measured."""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from hdrh.histogram import HdrHistogram

from bench.loadgen import Spec, new_histogram
from bench.procs import BenchError, Processes, log_tail

# One Python generator process keeps a steady schedule up to about this rate on this kind of
# machine; past it the schedule is split over several processes (checked: see `lag`).
RATE_PER_GENERATOR = 400
CLOSED_LOOP_GENERATORS = 2
START_DELAY_S = 1.5  # time for every generator process to import and connect


@dataclass(frozen=True)
class Target:
    """What one request is: where it goes and what it carries."""

    name: str
    url: str
    body: str
    headers: dict[str, str]
    stream: bool = False


@dataclass
class LoadResult:
    target: str
    mode: str  # "open" | "closed"
    rate: float = 0.0
    connections: int = 0
    duration: float = 0.0
    warmup: float = 0.0
    total: int | None = None
    generators: int = 1
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    latency: HdrHistogram = field(default_factory=new_histogram)
    first_event: HdrHistogram | None = None
    lag: HdrHistogram = field(default_factory=new_histogram)
    refused: HdrHistogram = field(default_factory=new_histogram)  # open loop: the 529s
    span_s: float = 0.0
    cpu_s: float = 0.0
    wall_s: float = 0.0
    driver: str = "python"
    samples: list[tuple[float, int]] = field(default_factory=list)  # (wall time, µs)
    percentiles: dict[float, float] | None = None  # ms, when the driver gives no histogram

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def achieved_rps(self) -> float:
        """Completed requests per second over the span of the recorded requests."""
        return self.ok / self.span_s if self.span_s > 0 else 0.0

    @property
    def over_capacity(self) -> bool:
        """An open-loop run that completed under 95% of its rate: its queue grew for the
        whole run, and so did its latencies."""
        return self.mode == "open" and self.achieved_rps < 0.95 * self.rate

    @property
    def generator_cpu(self) -> float:
        """CPU the generators used, in cores (1.0 = one core busy)."""
        return self.cpu_s / self.wall_s * self.generators if self.wall_s else 0.0

    def ms(self, q: float, which: str = "latency") -> float | None:
        if which == "latency" and self.percentiles is not None:
            return self.percentiles.get(q)
        hist = self.latency if which == "latency" else self.first_event if which == "first" \
            else self.refused if which == "refused" else self.lag
        if hist is None or hist.get_total_count() == 0:
            return None
        if q >= 100:
            return hist.get_max_value() / 1000
        return hist.get_value_at_percentile(q) / 1000

    def subset(self, start: float, end: float) -> LoadResult:
        """The requests due between two wall-clock times (needs `samples`); errors are not
        kept per request, so the subset has none."""
        part = LoadResult(self.target, self.mode, rate=self.rate, duration=end - start,
                          generators=self.generators)
        chosen = [(t, us) for t, us in self.samples if start <= t < end]
        for _, us in chosen:
            part.latency.record_value(us)
        part.ok = len(chosen)
        part.span_s = end - start
        return part

    def describe_load(self) -> str:
        if self.mode == "open":
            return f"open-loop {self.rate:g} RPS"
        if self.total is not None:
            return f"closed-loop {self.connections} conns, {self.total} requests"
        return f"closed-loop {self.connections} conns ({self.driver})"


Hook = Callable[[], None]


async def open_loop(procs: Processes, target: Target, rate: float, duration: float,
                    warmup: float, timeout_s: float = 60.0,
                    hooks: tuple[Hook, Hook] | None = None, samples: bool = False
                    ) -> LoadResult:
    generators = max(1, math.ceil(rate / RATE_PER_GENERATOR))
    base = replace(_spec(target, "open", duration, warmup, timeout_s), samples=samples)
    specs = [replace(base, rate=rate / generators, offset=k / rate,
                     connections=max(100, int(rate * 2)))
             for k in range(generators)]
    result = LoadResult(target.name, "open", rate=rate, duration=duration, warmup=warmup,
                        generators=generators)
    return await _run(procs, specs, result, hooks)


async def closed_loop(procs: Processes, target: Target, connections: int,
                      duration: float = 0.0, warmup: float = 0.0, total: int | None = None,
                      timeout_s: float = 60.0, hooks: tuple[Hook, Hook] | None = None
                      ) -> LoadResult:
    generators = min(CLOSED_LOOP_GENERATORS, connections)
    base = _spec(target, "closed", duration, warmup, timeout_s)
    specs = []
    for k in range(generators):
        share = connections // generators + (k < connections % generators)
        part = None if total is None else total // generators + (k < total % generators)
        specs.append(replace(base, connections=share, total=part))
    result = LoadResult(target.name, "closed", connections=connections, duration=duration,
                        warmup=warmup, total=total, generators=generators)
    return await _run(procs, specs, result, hooks)


def _spec(target: Target, mode: str, duration: float, warmup: float, timeout: float) -> Spec:
    return Spec(url=target.url, body=target.body, headers=target.headers, mode=mode,
                start_at=0.0, duration=duration, warmup=warmup, stream=target.stream,
                timeout=timeout)


async def _run(procs: Processes, specs: list[Spec], result: LoadResult,
               hooks: tuple[Hook, Hook] | None) -> LoadResult:
    """`hooks`: called when the measured window opens (after the warm-up) and when the last
    generator has finished."""
    start_at = time.time() + START_DELAY_S
    names = []
    for k, spec in enumerate(specs):
        name = f"loadgen.{k}"
        payload = json.dumps(replace(spec, start_at=start_at).__dict__)
        procs.start(name, [sys.executable, "-m", "bench.loadgen", payload],
                    env=_generator_env(), capture_stdout=True)
        names.append(name)
    try:
        collecting = asyncio.gather(*(_collect(procs, n) for n in names))
        if hooks is not None:
            await asyncio.sleep(max(0.0, start_at + specs[0].warmup - time.time()))
            hooks[0]()
        outputs = await collecting
        if hooks is not None:
            hooks[1]()
    finally:
        procs.stop_many([n for n in names if n in procs.running()], timeout=2)
    spans = []
    if specs[0].stream:
        result.first_event = new_histogram()
    for out in outputs:
        result.ok += out["ok"]
        for kind, n in out["errors"].items():
            result.errors[kind] = result.errors.get(kind, 0) + n
        result.latency.decode_and_add(out["latency"])
        result.lag.decode_and_add(out["lag"])
        result.refused.decode_and_add(out["refused"])
        if result.first_event is not None and out["first_event"]:
            result.first_event.decode_and_add(out["first_event"])
        if out["first_send"] is not None:
            spans.append((out["first_send"], out["last_done"]))
        result.cpu_s += out["cpu_s"]
        result.samples.extend(out.get("samples") or ())
        result.wall_s = max(result.wall_s, out["wall_s"])
    if spans:
        result.span_s = max(e for _, e in spans) - min(s for s, _ in spans)
    result.cpu_s /= len(outputs)  # mean per generator; generator_cpu scales it back
    return result


async def _collect(procs: Processes, name: str) -> dict:  # type: ignore[type-arg]
    proc = procs.get(name)
    stdout, _ = await asyncio.to_thread(proc.communicate)
    if proc.returncode != 0:
        raise BenchError(f"{name} failed ({proc.returncode}):\n{log_tail(procs.logs[name])}")
    return json.loads(stdout.decode().strip().splitlines()[-1])


def _generator_env() -> dict[str, str]:
    import os

    return {**os.environ, "PYTHONUNBUFFERED": "1"}
