"""The coalescer the worker's claims and finishes go through, driven by a recording batch call
(the store's batched forms are tested against PostgreSQL in tests/integration)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from shared.store import StoreUnavailable
from worker.batching import Coalescer


class Recorder:
    """A batch call that doubles each item, fails the items < 0 alone, and holds every batch
    until released (so that calls arriving meanwhile queue up)."""

    def __init__(self, outage: int = 0) -> None:
        self.batches: list[list[int]] = []
        self.release = asyncio.Event()
        self.outage = outage

    async def __call__(self, items: list[int]) -> Sequence[int | Exception]:
        self.batches.append(items)
        await self.release.wait()
        if self.outage:
            self.outage -= 1
            raise StoreUnavailable()
        return [ValueError(f"bad {i}") if i < 0 else i * 2 for i in items]


async def test_calls_made_while_a_batch_runs_share_the_next_one() -> None:
    call = Recorder()
    coalesce = Coalescer(call, max_batch=100, max_flushes=1)
    first = asyncio.create_task(coalesce(0))
    await asyncio.sleep(0)
    rest = [asyncio.create_task(coalesce(i)) for i in range(1, 51)]
    await asyncio.sleep(0)
    call.release.set()
    assert await asyncio.gather(first, *rest) == [i * 2 for i in range(51)]
    assert call.batches == [[0], list(range(1, 51))]


async def queued(coalesce: Coalescer[int, int], call: Recorder,
                 items: Sequence[int]) -> list[int | BaseException]:
    """Results of `items` called while a first batch runs (so that they queue up together)."""
    first = asyncio.create_task(coalesce(0))
    await asyncio.sleep(0)
    tasks = [asyncio.create_task(coalesce(i)) for i in items]
    await asyncio.sleep(0)
    call.release.set()
    await asyncio.gather(first, return_exceptions=True)
    return await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_batch_holds_at_most_max_batch_items() -> None:
    call = Recorder()
    coalesce = Coalescer(call, max_batch=4, max_flushes=1)
    assert await queued(coalesce, call, range(1, 11)) == [i * 2 for i in range(1, 11)]
    assert [len(b) for b in call.batches] == [1, 4, 4, 2]


async def test_an_item_that_fails_fails_alone() -> None:
    call = Recorder()
    coalesce = Coalescer(call, max_flushes=1)
    results = await queued(coalesce, call, (1, -2, 3))
    assert results[0] == 2 and results[2] == 6
    assert isinstance(results[1], ValueError) and str(results[1]) == "bad -2"
    assert call.batches == [[0], [1, -2, 3]]


async def test_an_outage_reaches_every_caller_and_each_may_retry() -> None:
    call = Recorder(outage=2)  # the first batch, [0], and the next
    coalesce = Coalescer(call, max_flushes=1)
    results = await queued(coalesce, call, range(1, 4))
    assert [len(b) for b in call.batches] == [1, 3]
    assert all(isinstance(r, StoreUnavailable) for r in results)
    assert await asyncio.gather(*(coalesce(i) for i in range(1, 4))) == [2, 4, 6]


async def test_a_caller_cancelled_before_its_batch_starts_leaves_it() -> None:
    call = Recorder()
    coalesce = Coalescer(call, max_flushes=1)
    first = asyncio.create_task(coalesce(1))
    await asyncio.sleep(0)
    gone, stays = asyncio.create_task(coalesce(2)), asyncio.create_task(coalesce(3))
    await asyncio.sleep(0)
    gone.cancel()
    call.release.set()
    assert (await first, await stays) == (2, 6)
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert call.batches == [[1], [3]]
