"""Pacing shared through PostgreSQL (migration 0007): several pacers, as several workers would
hold, keep one key at its rate together, and one worker's 429 holds the others back."""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from shared.pacestore import PaceStore, key_fingerprint
from shared.store import Store
from worker.pacing import SAFETY, KeyLimits, Pacer, Saturated

RATE = 20  # requests per second the "provider" allows


def headers(remaining: int = 0) -> tuple[tuple[str, str], ...]:
    return (("anthropic-ratelimit-requests-limit", str(RATE * 60)),
            ("anthropic-ratelimit-requests-remaining", str(remaining)))


async def paced_call(pacer: Pacer, status: int = 200, retry_after: float | None = None,
                     horizon: float = 60.0) -> float:
    async with pacer.slot("anthropic", "sk-test", horizon) as slot:
        started = time.monotonic()
        slot.answered(headers(), status, retry_after)
    return started


async def test_reserve_grants_slots_up_to_the_horizon(store: Store) -> None:
    pace = PaceStore(store)
    fp = key_fingerprint("sk-a")
    first = await pace.reserve("anthropic", fp, 0.1, 5, 1.0)
    assert (first.granted, round(first.first_s, 1)) == (5, 0.0)
    second = await pace.reserve("anthropic", fp, 0.1, 20, 1.0)
    # The next free slot is 0.5 s after the first reservation; those up to 1 s from now are
    # granted (six, less any the time between the two statements let pass).
    assert 0 < second.first_s <= 0.5
    assert second.granted == math.floor((1.0 - second.first_s) / 0.1) + 1
    none = await pace.reserve("anthropic", fp, 0.1, 3, 0.05)
    assert none.granted == 0 and none.first_s > 1.0
    assert "sk-a" not in str(await store_rows(store))  # the key is never stored


async def store_rows(store: Store) -> list[dict[str, object]]:
    async with store._conn() as conn:
        return [dict(r) for r in await conn.fetch("SELECT provider, key_fp FROM provider_pace")]


async def test_workers_share_one_rate(store: Store) -> None:
    workers = [Pacer(PaceStore(store)) for _ in range(3)]
    for pacer in workers:  # each learns the limit from an answer (the probe)
        await paced_call(pacer)
    calls = 30
    starts = sorted(await asyncio.gather(
        *(paced_call(workers[n % 3]) for n in range(calls))))
    span = starts[-1] - starts[0]
    interval = 1 / (RATE * SAFETY)
    # Together, not each: 3 pacers on their own would have done it in a third of the time.
    assert span >= (calls - 1) * interval * 0.9


async def test_one_workers_429_holds_the_others_back(store: Store) -> None:
    a, b = Pacer(PaceStore(store)), Pacer(PaceStore(store))
    await paced_call(a)
    await paced_call(b)
    await paced_call(a, status=429, retry_after=1.0)
    await asyncio.sleep(0.1)  # the block is written in the background
    started = time.monotonic()
    await paced_call(b)
    assert time.monotonic() - started >= 0.8


async def test_a_new_worker_starts_from_what_the_others_learned(store: Store) -> None:
    old = Pacer(PaceStore(store))
    await paced_call(old)
    await paced_call(old)  # reserves through the store: the row exists now
    new = Pacer(PaceStore(store))
    await paced_call(new)
    assert new.rate("anthropic", "sk-test") is not None


async def test_max_concurrency_holds_over_all_workers(store: Store) -> None:
    limits = {("anthropic", "sk-test"): KeyLimits(max_concurrency=2)}
    workers = [Pacer(PaceStore(store), limits) for _ in range(3)]
    running = peak = 0

    async def one(pacer: Pacer) -> None:
        nonlocal running, peak
        async with pacer.slot("anthropic", "sk-test", 30):
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.05)
            running -= 1

    await asyncio.gather(*(one(workers[n % 3]) for n in range(9)))
    assert peak == 2  # three workers, two places
    async with store._conn() as conn:
        assert await conn.fetchval("SELECT count(*) FROM provider_leases") == 0


async def test_no_place_within_the_horizon_is_saturated(store: Store) -> None:
    limits = {("anthropic", "sk-test"): KeyLimits(max_concurrency=1)}
    a, b = Pacer(PaceStore(store), limits), Pacer(PaceStore(store), limits)
    async with a.slot("anthropic", "sk-test", 30):
        with pytest.raises(Saturated):
            async with b.slot("anthropic", "sk-test", 0.2):
                pass
