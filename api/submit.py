"""Durable submits in batches: concurrent submits share one INSERT, one commit and one wait
for the broker's confirms, so the cost per job falls as load rises. At low load a batch is a
single job and nothing waits for company."""

from __future__ import annotations

import asyncio

from shared.broker import Broker
from shared.errors import FerryError, Unavailable
from shared.jobs import JobEnvelope
from shared.logging import get_logger
from shared.store import NewJob, Store

log = get_logger("ferry.api")

MAX_BATCH = 200
MAX_FLUSHES = 4  # batches in flight at once: overlaps database and broker round trips

_Pending = tuple[NewJob, JobEnvelope, "asyncio.Future[None]"]


class SubmitBatcher:
    def __init__(self, store: Store, broker: Broker) -> None:
        self._store = store
        self._broker = broker
        self._queue: list[_Pending] = []
        self._flushes: set[asyncio.Task[None]] = set()

    async def submit(self, job: NewJob, envelope: JobEnvelope) -> None:
        """Returns once the job is committed and its message confirmed; raises FerryError
        (and leaves nothing behind) otherwise."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((job, envelope, done))
        self._maybe_flush()
        # A client that goes away must not cancel the batch it shares with others.
        await asyncio.shield(done)

    def _maybe_flush(self) -> None:
        if self._queue and len(self._flushes) < MAX_FLUSHES:
            batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
            task = asyncio.create_task(self._flush(batch))
            self._flushes.add(task)
            task.add_done_callback(self._flush_done)

    def _flush_done(self, task: asyncio.Task[None]) -> None:
        self._flushes.discard(task)
        self._maybe_flush()

    async def _flush(self, batch: list[_Pending]) -> None:
        outcome: dict[int, BaseException | None] = {}
        try:
            async with self._store.submitting_many([job for job, _, _ in batch]) as discard:
                results = await asyncio.gather(
                    *(self._broker.publish_job(envelope) for _, envelope, _ in batch),
                    return_exceptions=True,
                )
                outcome = {i: r for i, r in enumerate(results) if isinstance(r, BaseException)}
                if outcome:
                    await discard([batch[i][0].id for i in outcome])
        except FerryError as exc:
            outcome = dict.fromkeys(range(len(batch)), exc)
        except Exception as exc:  # the commit itself failed: nothing of the batch exists
            log.exception("submit batch failed")
            failure = Unavailable("the job could not be stored; retry later")
            failure.__cause__ = exc
            outcome = dict.fromkeys(range(len(batch)), failure)
        for i, (_, _, done) in enumerate(batch):
            if done.done():
                continue
            error = outcome.get(i)
            if error is None:
                done.set_result(None)
            else:
                done.set_exception(error if isinstance(error, FerryError)
                                   else Unavailable("the job could not be queued; retry later"))
