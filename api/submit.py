"""Durable submits: a transactional outbox, in batches.

A submit commits the job row and its message first, then publishes the message with a
publisher confirm; the client's 200 means both happened. A publish that fails withdraws the
row (the client gets an error and nothing runs); if the api dies between commit and publish,
the reconciler finds the unpublished row and publishes it. Worker and api can never race:
the row exists before any message names it.

Concurrent submits share one INSERT and one commit, so the cost per job falls as load rises;
at low load a batch is a single job and nothing waits for company. A member the database
refuses fails alone (the batch is retried row by row), and each message is confirmed or
refused on its own.
"""

from __future__ import annotations

import asyncio
import uuid

from shared.broker import Broker
from shared.errors import FerryError, Unavailable
from shared.jobs import Status
from shared.logging import get_logger
from shared.runtime import wait_set
from shared.store import NewJob, Store

log = get_logger("ferry.api")

MAX_BATCH = 200
MAX_FLUSHES = 4  # batches in flight at once: overlaps database and broker round trips
MAX_MARK = 5000  # published jobs recorded per statement
MARK_EVERY_S = 0.25  # how long published jobs gather before one statement records them all
RECONNECT_WAIT_S = 3.0  # how long a submit waits for the broker connection to come back
DRAIN_TIMEOUT_S = 10.0  # how long shutdown waits for batches in flight and their marks

_Pending = tuple[NewJob, "asyncio.Future[None]"]


class SubmitBatcher:
    def __init__(self, store: Store, broker: Broker) -> None:
        self._store = store
        self._broker = broker
        self._queue: list[_Pending] = []
        self._flushes: set[asyncio.Task[None]] = set()
        self._marks: list[uuid.UUID] = []  # published, not yet recorded as such
        self._marking: asyncio.Task[None] | None = None
        self._draining = asyncio.Event()

    async def submit(self, job: NewJob) -> None:
        """Returns once the job is committed and its message confirmed; raises FerryError
        (and leaves nothing that will run) otherwise."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((job, done))
        self._maybe_flush()
        # A client that goes away must not cancel the batch it shares with others.
        await asyncio.shield(done)

    async def submit_idempotent(self, job: NewJob, key: str,
                                request_hash: bytes) -> tuple[uuid.UUID, Status]:
        """`submit` under an Idempotency-Key: the same key and request within 24 hours
        answer the job the first one created (id and current status)."""
        job_id, status, created = await self._store.insert_idempotent(job, key, request_hash)
        if created:
            await asyncio.shield(self._publish([job]))
        return job_id, status

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
        try:
            errors = await self._store.insert_jobs([job for job, _ in batch])
        except FerryError as exc:
            _fail(batch, exc)
            return
        except Exception as exc:
            log.exception("submit batch could not be stored")
            failure = Unavailable("the job could not be stored; retry later")
            failure.__cause__ = exc
            _fail(batch, failure)
            return
        stored = []
        for (job, done), error in zip(batch, errors, strict=True):
            if error is None:
                stored.append((job, done))
            elif not done.done():
                done.set_exception(error)
        if not stored:
            return
        results = await self._publish_each([job for job, _ in stored])
        for (_, done), result in zip(stored, results, strict=True):
            if result is None and not done.done():
                done.set_result(None)  # answered at once; the bookkeeping follows
        await self._settle([job for job, _ in stored], results)
        for (_, done), result in zip(stored, results, strict=True):
            if result is not None and not done.done():
                done.set_exception(result)  # answered once its row is withdrawn

    async def _publish(self, jobs: list[NewJob]) -> None:
        results = await self._publish_each(jobs)
        await self._settle(jobs, results)
        for result in results:
            if result is not None:
                raise result

    async def _publish_each(self, jobs: list[NewJob]) -> list[FerryError | None]:
        outcomes = await asyncio.gather(*(self._publish_one(job) for job in jobs),
                                        return_exceptions=True)
        results: list[FerryError | None] = []
        for outcome in outcomes:
            if outcome is None or isinstance(outcome, FerryError):
                results.append(outcome)
            else:
                log.error("publish failed unexpectedly", error=repr(outcome))
                results.append(Unavailable("the job could not be queued; retry later"))
        return results

    async def _publish_one(self, job: NewJob) -> None:
        """Publish; if the broker connection went, once more on the node the process moves
        to (on a cluster, within moments). A duplicate from a confirm lost with the old
        connection is harmless: the job row lets one worker run it."""
        try:
            await self._broker.publish_raw_job(job.id, job.message)
        except Unavailable:
            if not await self._broker.link.wait_up(RECONNECT_WAIT_S):
                raise
            await self._broker.publish_raw_job(job.id, job.message)

    async def _settle(self, jobs: list[NewJob], results: list[FerryError | None]) -> None:
        """After the answers: withdraw what was not published, and hand what was to the
        marker (which records it in the background)."""
        self._marks.extend(job.id for job, r in zip(jobs, results, strict=True) if r is None)
        if self._marks and self._marking is None:
            self._marking = asyncio.create_task(self._mark())
        refused = [job.id for job, r in zip(jobs, results, strict=True) if r is not None]
        if not refused:
            return
        try:
            await self._store.withdraw(refused)
        except FerryError as exc:
            log.warning("could not withdraw the refused members of a submit batch; the "
                        "reconciler will publish them", error=exc.message, refused=len(refused))

    async def _mark(self) -> None:
        """Record published jobs, one statement every MARK_EVERY_S for all the batches
        confirmed since the last, so marking never holds up a batch (or a flush slot) and
        costs the database one statement for hundreds of jobs, not one per batch (measured
        at saturation: PostgreSQL from about 0.5 to 0.25 core, at more submits/s). Well
        within the reconciler's grace (FERRY_OUTBOX_GRACE): what is lost here (an error, a
        crash) only costs a duplicate message, since the reconciler publishes rows left
        unmarked and the job row lets one worker run it."""
        try:
            while self._marks:
                await wait_set(self._draining, MARK_EVERY_S)
                ids, self._marks = self._marks[:MAX_MARK], self._marks[MAX_MARK:]
                try:
                    await self._store.mark_published(ids)
                except FerryError as exc:
                    log.warning("could not record published submits; the reconciler will "
                                "publish them again", error=exc.message, published=len(ids))
                except Exception:
                    log.exception("could not record published submits; the reconciler will "
                                  "publish them again", published=len(ids))
        finally:
            self._marking = None

    async def drain(self) -> None:
        """Wait for the batches in flight and the marks they leave (at shutdown, before the
        broker and the store close), for at most DRAIN_TIMEOUT_S: what is still unmarked
        then, the reconciler publishes again. Marks gathering are recorded at once."""
        self._draining.set()
        try:
            async with asyncio.timeout(DRAIN_TIMEOUT_S):
                while self._flushes or self._marking is not None:
                    await asyncio.gather(*self._flushes, *filter(None, [self._marking]),
                                         return_exceptions=True)
        except TimeoutError:
            log.warning("submit batches still in flight at shutdown were left to the "
                        "reconciler", batches=len(self._flushes), unmarked=len(self._marks))


def _fail(batch: list[_Pending], error: FerryError) -> None:
    for _, done in batch:
        if not done.done():
            done.set_exception(error)
