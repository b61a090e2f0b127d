"""Pacing on its own (no database): what it learns from headers and 429s, and how calls wait.
The database-shared version is in tests/integration/test_pacing.py."""

from __future__ import annotations

import asyncio
import time

import pytest

from worker.pacing import ENGAGE_SECONDS, SAFETY, KeyLimits, Pacer, Saturated, read_limits
from worker.routing import KeyPool


def limits(per_minute: int, remaining: int) -> tuple[tuple[str, str], ...]:
    return (("anthropic-ratelimit-requests-limit", str(per_minute)),
            ("anthropic-ratelimit-requests-remaining", str(remaining)))


def test_read_limits() -> None:
    assert read_limits(limits(2400, 39)) == (2400, 39)
    assert read_limits((("anthropic-ratelimit-requests-limit", "60"),)) is None
    assert read_limits(limits(60, 0)[:1] + (("anthropic-ratelimit-requests-remaining", "x"),)
                       ) is None
    assert read_limits(()) is None


async def call(pacer: Pacer, key: str = "k", headers: tuple[tuple[str, str], ...] = (),
               status: int | None = 200, retry_after: float | None = None,
               horizon: float = 60.0, block_max: float | None = None) -> float:
    """One paced call; returns when it started (monotonic)."""
    async with pacer.slot("p", key, horizon, block_max) as slot:
        started = time.monotonic()
        slot.answered(headers, status, retry_after)
    return started


async def test_a_key_with_plenty_left_is_not_paced() -> None:
    pacer = Pacer(None)
    await call(pacer, headers=limits(600, 500))  # 10/s, 50 s worth left
    started = time.monotonic()
    await asyncio.gather(*(call(pacer, headers=limits(600, 450)) for _ in range(50)))
    assert time.monotonic() - started < 3  # paced, 50 calls would take 5 s
    assert pacer.rate("p", "k") == 10


async def test_a_key_running_low_is_paced_at_its_learned_rate() -> None:
    pacer = Pacer(None)
    rate = 20  # requests per second: 1,200 a minute
    await call(pacer, headers=limits(rate * 60, int(rate * ENGAGE_SECONDS) - 1))
    starts = sorted(await asyncio.gather(
        *(call(pacer, headers=limits(rate * 60, 0)) for _ in range(10))))
    interval = 1 / (rate * SAFETY)
    # Each call starts at its slot or later (a sleep runs late, never early), and the first
    # slot is now: the n-th start is at least n intervals after the first.
    for n, start in enumerate(starts):
        assert start - starts[0] >= n * interval - 0.005


async def test_a_429_shuts_the_key_for_its_retry_after() -> None:
    pacer = Pacer(None)
    await call(pacer, status=429, retry_after=0.3)
    started = time.monotonic()
    await call(pacer)
    assert time.monotonic() - started >= 0.25
    # Beyond the caller's patience: it is told when to come back instead of waiting.
    await call(pacer, status=429, retry_after=5)
    with pytest.raises(Saturated) as full:
        await call(pacer, block_max=1.0)
    assert 4 < full.value.wait_s <= 5


async def test_no_slot_within_the_horizon_is_saturated() -> None:
    pacer = Pacer(None, {("p", "k"): KeyLimits(rpm=60)})  # configured: paced from the start
    await call(pacer, horizon=0.1)  # the first slot is now
    with pytest.raises(Saturated) as full:
        await call(pacer, horizon=0.1)  # the next is a second away
    assert 0.9 < full.value.wait_s <= 1 / SAFETY + 0.01


async def test_the_first_call_on_an_unknown_key_goes_alone() -> None:
    pacer = Pacer(None)
    order: list[str] = []
    release = asyncio.Event()

    async def probe() -> None:
        async with pacer.slot("p", "k", 60) as slot:
            order.append("probe")
            await release.wait()
            slot.answered(limits(600, 0))  # 10/s, nothing left: paced from now on

    async def follower(n: int) -> None:
        async with pacer.slot("p", "k", 60) as slot:
            order.append(f"call{n}")
            slot.answered(limits(600, 0))

    first = asyncio.create_task(probe())
    await asyncio.sleep(0)
    others = [asyncio.create_task(follower(n)) for n in range(3)]
    await asyncio.sleep(0.05)
    assert order == ["probe"]  # the others wait for what it learns
    release.set()
    await asyncio.gather(first, *others)
    assert order[0] == "probe" and len(order) == 4


async def test_calls_go_to_the_key_whose_turn_comes_first() -> None:
    """Two keys of 30 and 10 requests/s, learned cold: each key's first call learns its limit
    while the rest wait for it, then every call takes the key whose next slot comes first, so
    the keys share the burst 3:1, not evenly (the slow key would then hold the batch up)."""
    pacer = Pacer(None)
    pool = KeyPool([("a", 1.0), ("b", 1.0)], 60)
    headers = {"a": limits(1800, 0), "b": limits(600, 0)}  # nothing left: paced at once
    picked: list[str] = []

    async def one() -> None:
        await pacer.settle("p", pool.names())
        key = pool.pick(lambda k: pacer.soonest("p", k), lambda k: pacer.rate("p", k))
        assert key is not None
        picked.append(key)
        async with pacer.slot("p", key, 60) as slot:
            await asyncio.sleep(0.01)
            slot.answered(headers[key])

    await asyncio.gather(*(one() for _ in range(60)))
    assert sorted(picked[:2]) == ["a", "b"]
    # 45 of 60 is a's share of 40/s: 45 turns at 30/s and 15 at 10/s both take 1.5 s.
    assert 42 <= picked.count("a") <= 48


async def test_the_configured_rate_wins_when_lower() -> None:
    pacer = Pacer(None, {("p", "k"): KeyLimits(rpm=120)})
    await call(pacer, headers=limits(6000, 5000))
    assert pacer.rate("p", "k") == 2


async def test_max_concurrency_per_worker() -> None:
    pacer = Pacer(None, {("p", "k"): KeyLimits(max_concurrency=2)})
    running = peak = 0

    async def one() -> None:
        nonlocal running, peak
        async with pacer.slot("p", "k", 60):
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.01)
            running -= 1

    await asyncio.gather(*(one() for _ in range(8)))
    assert peak == 2


async def test_pacing_off_only_honours_its_own_429s() -> None:
    pacer = Pacer(None, {("p", "k"): KeyLimits(rpm=60)}, learn=False)
    started = time.monotonic()
    await asyncio.gather(*(call(pacer, headers=limits(60, 0)) for _ in range(20)))
    assert time.monotonic() - started < 10  # paced at 1/s, 20 calls would take 19 s
    assert pacer.rate("p", "k") is None
    await call(pacer, status=429, retry_after=0.3)
    started = time.monotonic()
    await call(pacer)
    assert time.monotonic() - started >= 0.25


async def test_a_token_limit_spaces_calls_by_the_tokens_they_used() -> None:
    pacer = Pacer(None, {("p", "k"): KeyLimits(tpm=600)})  # 10 tokens a second
    async with pacer.slot("p", "k", 60) as slot:
        slot.answered((), 200, None, tokens=5)  # half a second's worth
    await asyncio.sleep(0)  # the debit is recorded in the background
    started = time.monotonic()
    await call(pacer)
    assert time.monotonic() - started >= 0.4


async def test_a_token_limit_learned_from_headers_engages_when_running_low() -> None:
    pacer = Pacer(None)
    plenty = (("anthropic-ratelimit-tokens-limit", "600000"),
              ("anthropic-ratelimit-tokens-remaining", "590000"))
    async with pacer.slot("p", "k", 60) as slot:
        slot.answered(plenty, 200, None, tokens=50_000)
    await asyncio.sleep(0)
    started = time.monotonic()
    await call(pacer)
    assert time.monotonic() - started < 2  # not debited; debited, it would wait 5 s
    low = (("anthropic-ratelimit-tokens-limit", "600"),
           ("anthropic-ratelimit-tokens-remaining", "3"))
    async with pacer.slot("p", "k", 60) as slot:
        slot.answered(low, 200, None, tokens=5)
    await asyncio.sleep(0)
    started = time.monotonic()
    await call(pacer)
    assert time.monotonic() - started >= 0.4
