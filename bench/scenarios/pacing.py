"""Scenario 10: pacing to a provider's rate limit (worker/pacing.py). N async jobs against a
fake provider that allows R requests/s per key (a token bucket answering 429 with
`retry-after` and Anthropic's rate-limit headers past it): time from the first submit to the
last completion against the ideal N / R, and the share of upstream calls answered 429. With 2
and 4 workers on one key, then on two keys of different limits (weighted by capacity)."""

from __future__ import annotations

import os
import tempfile

from bench.context import Bench
from bench.procs import BenchError, progress
from bench.scenarios.jobs import _submit, _wait

RATE = 40.0  # requests per second, over all keys
TWO_KEYS = {"sk-bench-paced-a": 30.0, "sk-bench-paced-b": 10.0}
GOAL_RATIO = 1.15
GOAL_429 = 0.02


def _providers_file(b: Bench, keys: list[str]) -> str:
    """The anthropic provider with these keys (the workers read it; the api routes only)."""
    lines = ["[providers.anthropic]", 'type = "anthropic"', f'base_url = "{b.stack.fake_url}"',
             "keys = [" + ", ".join(f'{{ key = "{k}" }}' for k in keys) + "]"]
    handle = tempfile.NamedTemporaryFile("w", suffix=".toml", prefix="ferry-bench-pacing-",
                                         delete=False)
    with handle:
        handle.write("\n".join(lines) + "\n")
    return handle.name


async def run_pacing(b: Bench) -> None:
    scenario = "10 pacing"
    count = 400 if b.quick else 1200
    rows = [
        (2, {"sk-bench-upstream": RATE}, False),  # before: what the issue measured
        (2, {"sk-bench-upstream": RATE}, True),
        (4, {"sk-bench-upstream": RATE}, True),
        (2, TWO_KEYS, True),
        (4, TWO_KEYS, True),
    ]
    for workers, keys, pacing in rows:
        await _row(b, scenario, count, workers, keys, pacing)
    b.stack.stop_workers()
    await b.reset()


async def _row(b: Bench, scenario: str, count: int, workers: int,
               keys: dict[str, float], pacing: bool) -> None:
    b.stack.stop_workers()
    await b.reset()
    await b.db.forget_pacing()
    await b.stack.limit_fake(keys)
    rate = sum(keys.values())
    path = _providers_file(b, list(keys))
    try:
        await b.stack.start_workers(
            workers, {"FERRY_PROVIDERS_FILE": path, "FERRY_PACING": "on" if pacing else "off"},
            wait_interactive=False)
        label = (f"{len(keys)} key(s) at {' + '.join(f'{r:g}' for r in keys.values())}"
                 f" req/s, {workers} workers" + ("" if pacing else ", FERRY_PACING=off"))
        progress(f"{scenario}: {count} jobs, {label}")

        async def run() -> None:
            ok = (await _submit(b, scenario, "paced job", count)).ok
            if ok != count:
                raise BenchError(f"only {ok} of {count} submits were accepted")
            await _wait(b, count, timeout_s=count / rate * 4 + 30)

        _, cpu = await b.measured(run)
    finally:
        os.unlink(path)
    span = await b.db.async_job_span()
    counts = await b.db.status_counts()
    seconds = (span.last_completed or 0) - (span.first_submitted or 0)
    if span.count < count:  # failed jobs: the time to the last one finished, either way
        seconds = await b.db.last_finished() - (span.first_submitted or 0)
    ideal = count / rate
    stats = await b.stack.fake_calls_by_key()
    calls = {key: sum(stats.get(key, {}).values()) for key in keys}
    limited = {key: stats.get(key, {}).get("429", 0) for key in keys}
    total, total_429 = sum(calls.values()), sum(limited.values())
    share = total_429 / total if total else 0.0
    ratio = seconds / ideal
    met = ratio <= GOAL_RATIO and share < GOAL_429 and span.count == count
    per_key = ", ".join(f"{key[-1] if len(keys) > 1 else 'key'}: {calls[key]} calls, "
                        f"{limited[key]}×429" for key in keys)
    b.report.figure(
        scenario, f"N jobs at R req/s: time / (N/R); 429 share ({label})",
        f"{ratio:.3f}× ({seconds:.1f} s vs {ideal:.1f} s); {share:.2%} 429s"
        + (" — goal met" if met else " — goal NOT met"),
        f"{count} async jobs submitted at once (64 connections), fake provider limit "
        f"{rate:g} req/s (bucket = 1 s of its rate), upstream 0 ms",
        f"{seconds:.1f} s",
        f"first submitted_at → last completed_at, jobs table; upstream calls by status from "
        f"the fake provider ({per_key}); jobs {counts}; pace row cleared before the row "
        f"(cold start); CPU: {cpu.describe()}")
