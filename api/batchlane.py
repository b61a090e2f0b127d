"""The batch lane's front half in the api: creates in flight (each holds a connection of its
own) and the publishing of a new batch's requests, in order, once it is committed. Whatever a
stopped api leaves unpublished, the reconciler publishes."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator

from shared.batchstore import BatchStore, format_batch_id
from shared.broker import Broker
from shared.errors import FerryError
from shared.logging import get_logger
from shared.runtime import stop_task

log = get_logger("ferry.batches")

PUBLISH_CHUNK = 1000
MAX_CONCURRENT_CREATES = 4  # per api process; each holds a connection of its own


class Batches:
    """The api's batch machinery: the store, and the background publishers of new batches."""

    def __init__(self, store: BatchStore, broker: Broker) -> None:
        self.store = store
        self._broker = broker
        self.creates = asyncio.Semaphore(MAX_CONCURRENT_CREATES)
        self._publishers: set[asyncio.Task[None]] = set()

    def publish_later(self, batch_id: uuid.UUID, count: int) -> None:
        task = asyncio.create_task(self._publish(batch_id, count))
        self._publishers.add(task)
        task.add_done_callback(self._publishers.discard)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Batches]:
        try:
            yield self
        finally:
            # What is left unpublished, the reconciler publishes.
            await asyncio.gather(*(stop_task(task) for task in list(self._publishers)),
                                 return_exceptions=True)

    async def _publish(self, batch_id: uuid.UUID, count: int) -> None:
        """Queue a new batch's requests in order, marking them published as the broker
        confirms them."""
        broker, batches = self._broker, self.store
        after, published, started = -1, 0, time.monotonic()
        try:
            while True:
                rows = await batches.unpublished(batch_id, after, PUBLISH_CHUNK)
                if not rows:
                    break
                ids = [job_id for _, job_id in rows]
                confirmed = await broker.publish_batch_jobs(ids)
                if confirmed:
                    await batches.published_some(batch_id, confirmed)
                    published += len(confirmed)
                if len(confirmed) < len(ids):
                    log.warning("the batch queue refused requests; the reconciler will "
                                "publish the rest", batch_id=format_batch_id(batch_id),
                                published=published)
                    return
                after = rows[-1][0]
        except FerryError as exc:
            log.warning("could not publish a batch's requests; the reconciler will",
                        batch_id=format_batch_id(batch_id), error=exc.message,
                        published=published)
            return
        log.info("batch published", batch_id=format_batch_id(batch_id), requests=count,
                 published=published, seconds=round(time.monotonic() - started, 2))
