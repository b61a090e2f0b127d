"""Concurrent calls of one store operation share one batched call, as the api's submits do.

A worker runs many jobs at once, and each claims its row and later writes its outcome. Each
of those alone costs a round trip, a commit, and a pool checkout: coalesced, the cost per job
falls as load rises. At low load a batch is a single call, and nothing waits for company:
a call starts at once while fewer than `max_flushes` batches are in flight, and calls made
meanwhile form the next batch.

Every caller gets its own result or error: the batched operation answers one per item (an
item's error is its own), and an error of the whole batch (the database is away) reaches every
caller, each of which retries as it would have alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

I = TypeVar("I")  # noqa: E741 -- the item
R = TypeVar("R")  # its result

BatchCall = Callable[[list[I]], Awaitable[Sequence[R | Exception]]]


class Coalescer(Generic[I, R]):
    def __init__(self, call: BatchCall[I, R], *, max_batch: int = 100,
                 max_flushes: int = 2) -> None:
        self._call = call
        self._max_batch = max_batch
        self._max_flushes = max_flushes
        self._queue: list[tuple[I, asyncio.Future[R]]] = []
        self._flushes: set[asyncio.Task[None]] = set()

    async def __call__(self, item: I) -> R:
        """The item's result, or its error raised. A caller cancelled before its batch
        started leaves the batch; once it started, the batch runs on without it."""
        done: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, done))
        self._maybe_flush()
        return await done

    def _maybe_flush(self) -> None:
        while self._queue and len(self._flushes) < self._max_flushes:
            batch, self._queue = self._queue[:self._max_batch], self._queue[self._max_batch:]
            batch = [(item, done) for item, done in batch if not done.done()]
            if not batch:
                continue
            task = asyncio.create_task(self._flush(batch))
            self._flushes.add(task)
            task.add_done_callback(self._flush_done)

    def _flush_done(self, task: asyncio.Task[None]) -> None:
        self._flushes.discard(task)
        self._maybe_flush()

    async def _flush(self, batch: list[tuple[I, asyncio.Future[R]]]) -> None:
        try:
            results = await self._call([item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"a batch of {len(batch)} got {len(results)} results")
        except asyncio.CancelledError:
            for _, done in batch:
                done.cancel()
            raise
        except Exception as exc:
            for _, done in batch:
                if not done.done():
                    done.set_exception(exc)
            return
        for (_, done), result in zip(batch, results, strict=True):
            if done.done():
                continue  # its caller was cancelled meanwhile
            if isinstance(result, Exception):
                done.set_exception(result)
            else:
                done.set_result(result)
