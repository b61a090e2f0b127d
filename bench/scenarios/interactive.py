"""Scenarios 1 and 2: sync JSON and SSE streaming through Ferry, against the same request sent
straight to the fake provider (and through LiteLLM with `--peer litellm`)."""

from __future__ import annotations

from bench.context import Bench
from bench.load import LoadResult, Target
from bench.report import LatencyRow, fmt_ms, fmt_rate
from bench.stack import BASE_ENV, ferry_headers, sync_body

SYNC_RATES = (100, 300, 1000)
SATURATION_CONNECTIONS = 64
OVERLOAD_FACTOR = 3  # the overload row offers this multiple of Ferry's closed-loop maximum
# The overload row again with this setting: the admission's shorter target, an operator's trade
# of burst tolerance for the latency of what is admitted (api/admission.py).
OVERLOAD_VARIANT = ("FERRY_ADMISSION_TARGET", "0.02")
STREAM_RATE = 50
STREAM_CHUNKS = 20

OPEN_HOW = "open-loop, latency from intended send time (HdrHistogram)"
CLOSED_HOW = "closed-loop, max completed/s; latency from actual send"
OVERLOAD_HOW = (f"open-loop at {OVERLOAD_FACTOR}× Ferry's closed-loop maximum of the same run; "
                "latency of the 200s from intended send time")
STREAM_HOW = (f"open-loop; first `event:` line and end of stream from intended send time; "
              f"{STREAM_CHUNKS} text deltas, no upstream delay")


def targets(b: Bench, body: str, stream: bool = False, floor: bool = False) -> list[Target]:
    found = [
        Target("ferry", f"{b.stack.api_url}/anthropic/v1/messages", body, ferry_headers(),
               stream),
        Target("direct", f"{b.stack.fake_url}/v1/messages", body, ferry_headers(), stream),
    ]
    if floor:  # bench/floor.py: the broker hop and nothing else
        found.insert(1, Target("floor", f"{b.stack.floor_url}/v1/messages", body,
                               ferry_headers(), stream))
    if b.peer is not None:
        found.append(Target("litellm", f"{b.peer.url}/v1/messages", body, b.peer.headers(),
                            stream))
    return found


async def run_sync(b: Bench) -> None:
    scenario = "1 sync"
    await b.stack.start_workers(b.workers)
    await b.stack.start_floor()
    try:
        await _sync_rows(b, scenario)
    finally:
        b.stack.stop_floor()


async def _sync_rows(b: Bench, scenario: str) -> None:
    body = sync_body()
    over: dict[str, float] = {}  # target -> the rate it could not keep up with
    for rate in SYNC_RATES:
        rows: dict[str, tuple[LoadResult, LatencyRow]] = {}
        for target in targets(b, body, floor=True):
            if target.name in over and target.name != "ferry":
                # A higher rate only lengthens its queue (and the time it takes to drain).
                b.report.note(f"{scenario}: {target.name} not run at {rate} RPS: it fell "
                              f"short of {over[target.name]:g} RPS already.")
                continue
            result = await b.open(scenario, target, rate, OPEN_HOW)
            rows[target.name] = (result, b.report.latency[-1])
            if result.over_capacity:
                over.setdefault(target.name, rate)
            await b.settle()
        _compare(b, scenario, f"at {rate} RPS", rows, "latency")

    maxima: dict[str, LoadResult] = {}
    for target in targets(b, body, floor=True):
        maxima[target.name] = await b.closed(
            scenario, target, SATURATION_CONNECTIONS, CLOSED_HOW,
            profile=("api", "worker.1") if target.name == "ferry" else ())
        await b.settle()
    ferry = maxima["ferry"]
    for name, result in maxima.items():
        b.report.figure(scenario, f"max RPS, {name}", f"{fmt_rate(result.achieved_rps)}/s",
                        result.describe_load(), f"{result.duration:g} s",
                        "completed 200s / measured window")
    refused = ferry.errors.get("http_529", 0)
    b.report.figure(scenario, "closed-loop refusals, ferry",
                    f"{refused} of {ferry.ok + ferry.error_count}", ferry.describe_load(),
                    f"{ferry.duration:g} s", "529s among the requests of the measured window")
    if ferry.achieved_rps:
        await _overload(b, scenario, body, ferry)
    if "litellm" in maxima and maxima["litellm"].achieved_rps:
        b.report.figure(scenario, "max RPS, Ferry/LiteLLM",
                        f"{ferry.achieved_rps / maxima['litellm'].achieved_rps:.3g}×",
                        ferry.describe_load(), f"{ferry.duration:g} s", "ratio of the two above")


async def _overload(b: Bench, scenario: str, body: str, closed: LoadResult) -> None:
    """Ferry offered several times what it completed in its closed loop: the excess should
    be refused quickly with 529, the rest served at about the closed-loop rate and fast.
    Then the same with the admission's shorter target (`OVERLOAD_VARIANT`), the api
    restarted for it, unless the run sets that target itself."""
    await _overload_row(b, scenario, body, closed, "")
    setting, value = OVERLOAD_VARIANT
    if setting in BASE_ENV:
        return
    await b.stack.start_api({setting: value})
    try:
        await _overload_row(b, scenario, body, closed, f"{setting}={value}")
    finally:
        await b.stack.start_api()


async def _overload_row(b: Bench, scenario: str, body: str, closed: LoadResult,
                        variant: str) -> None:
    rate = round(OVERLOAD_FACTOR * closed.achieved_rps)
    where = f"{OVERLOAD_FACTOR}× overload" + (f", {variant}" if variant else "")
    result = await b.open(scenario, targets(b, body)[0], rate, OVERLOAD_HOW,
                          label=f"ferry, {where}")
    await b.settle()
    load, window = result.describe_load(), f"{result.duration:g} s"
    b.report.figure(scenario, f"goodput at {where} / closed-loop maximum",
                    f"{result.achieved_rps / closed.achieved_rps:.0%} "
                    f"({fmt_rate(result.achieved_rps)}/s of {fmt_rate(closed.achieved_rps)}/s)",
                    load, window, "completed 200s/s over the closed-loop row's (run with "
                    "the default settings)")
    b.report.figure(scenario, f"accepted at {where}, p50 / p99",
                    f"{fmt_ms(result.ms(50))} / {fmt_ms(result.ms(99))} ms", load, window,
                    "the 200s, from intended send time")
    b.report.figure(scenario, f"refused at {where}: 529s, p50 / p99 "
                    "time to the answer",
                    f"{result.errors.get('http_529', 0)}, {fmt_ms(result.ms(50, 'refused'))}"
                    f" / {fmt_ms(result.ms(99, 'refused'))} ms", load, window,
                    "the 529s, from intended send time; other errors in the row")


async def run_stream(b: Bench) -> None:
    scenario = "2 stream"
    await b.stack.start_workers(b.workers)
    body = sync_body(f"Please stream a reply in many pieces [[fake:chunks={STREAM_CHUNKS}]]",
                     stream=True, max_tokens=256)
    rows: dict[str, tuple[LoadResult, LatencyRow]] = {}
    for target in targets(b, body, stream=True):
        result = await b.open(scenario, target, STREAM_RATE, STREAM_HOW)
        rows[target.name] = (result, b.report.latency[-1])
        await b.settle()
    _compare(b, scenario, f"at {STREAM_RATE} RPS, first event", rows, "first")
    _compare(b, scenario, f"at {STREAM_RATE} RPS, total", rows, "latency")


def _compare(b: Bench, scenario: str, where: str,
             rows: dict[str, tuple[LoadResult, LatencyRow]], which: str) -> None:
    """Ferry − direct (added ms) and Ferry / LiteLLM, on Ferry's row and as figures."""
    ferry, ferry_row = rows["ferry"]
    direct, _ = rows["direct"]
    parts = []
    f50, f99 = ferry.ms(50, which), ferry.ms(99, which)
    d50, d99 = direct.ms(50, which), direct.ms(99, which)
    if None not in (f50, f99, d50, d99):
        added = f"+{fmt_ms(f50 - d50)} / +{fmt_ms(f99 - d99)} ms"  # type: ignore[operator]
        parts.append(f"vs direct p50/p99 {added}")
        b.report.figure(scenario, f"added latency {where}, p50 / p99 (Ferry − direct)", added,
                        ferry.describe_load(), f"{ferry.duration:g} s", "difference of the rows")
    if "floor" in rows and not rows["floor"][0].over_capacity and not ferry.over_capacity:
        # Past either one's capacity the rows measure queues, not what a request costs.
        floor, _ = rows["floor"]
        l50, l99 = floor.ms(50, which), floor.ms(99, which)
        if None not in (f50, f99, l50, l99, d50, d99):
            design = f"+{fmt_ms(l50 - d50)} / +{fmt_ms(l99 - d99)} ms"  # type: ignore[operator]
            own = f"{_signed(f50 - l50)} / {_signed(f99 - l99)} ms"  # type: ignore[operator]
            parts.append(f"of which the broker hop (floor − direct) {design}")
            b.report.figure(scenario, f"the broker hop's floor {where}, p50 / p99 "
                            "(floor − direct)", design, floor.describe_load(),
                            f"{floor.duration:g} s", "difference of the rows; bench/floor.py")
            b.report.figure(scenario, f"Ferry's own added latency {where}, p50 / p99 "
                            "(Ferry − floor)", own, ferry.describe_load(),
                            f"{ferry.duration:g} s", "difference of the rows")
    if "litellm" in rows:
        peer, _ = rows["litellm"]
        l50, l99 = peer.ms(50, which), peer.ms(99, which)
        if None not in (f50, f99, l50, l99) and l50 and l99:
            ratio = f"{f50 / l50:.3g}× / {f99 / l99:.3g}×"  # type: ignore[operator]
            parts.append(f"Ferry/LiteLLM p50/p99 {ratio}")
            b.report.figure(scenario, f"Ferry/LiteLLM latency {where}, p50 / p99", ratio,
                            ferry.describe_load(), f"{ferry.duration:g} s",
                            "ratio of the rows (<1: Ferry faster)")
    if which == "first" and ferry.first_event is not None:
        # The stream's Ferry rows: first-event row is the one before the total row.
        index = b.report.latency.index(ferry_row)
        ferry_row = b.report.latency[index - 1]
    ferry_row.compare = "; ".join(parts)


def _signed(ms: float) -> str:
    return f"+{fmt_ms(ms)}" if ms >= 0 else f"−{fmt_ms(-ms)}"
