"""Long-poll: a poll with `x-ferry-wait: SECONDS` answers as soon as its job ends.

The waiting poll marks its job watched in PostgreSQL; the transaction that finishes a watched
job sends NOTIFY `ferry_job_done` with the job id, and one LISTEN connection per api process
wakes every local poll waiting for that id, which then reads the job once. No poll re-queries
while it waits. After the LISTEN connection was lost (notifications may have been missed),
every waiting poll reads its job again; while it is down, waiting polls read their job once a
second so that none waits out its full time for nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator

from prometheus_client import Gauge

from shared.logging import get_logger
from shared.notify import Listener
from shared.store import JOB_DONE_CHANNEL, JobView, Store

log = get_logger("ferry.waiters")

DEGRADED_RECHECK_S = 1.0


class JobWaiters:
    def __init__(self, store: Store, dsn: str, connect_timeout_s: float = 10.0,
                 gauge: Gauge | None = None) -> None:
        self._store = store
        self._gauge = gauge
        self._waiting: dict[uuid.UUID, set[asyncio.Future[None]]] = {}
        self._listener = Listener(dsn, JOB_DONE_CHANNEL, self._ended, self._wake_all,
                                  connect_timeout_s=connect_timeout_s)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[JobWaiters]:
        async with self._listener.running():
            yield self

    @property
    def count(self) -> int:
        return sum(len(waiters) for waiters in self._waiting.values())

    async def wait_listening(self, timeout_s: float) -> bool:
        return await self._listener.wait_listening(timeout_s)

    async def wait(self, job_id: uuid.UUID, owner: bytes, wait_s: float) -> JobView | None:
        """The job once it ended, or as it is after `wait_s` (None: it vanished meanwhile)."""
        deadline = time.monotonic() + wait_s
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters = self._waiting.setdefault(job_id, set())
        waiters.add(waiter)
        if self._gauge is not None:
            self._gauge.inc()
        try:
            await self._store.watch(job_id, owner)
            current: JobView | None = await self._store.get_job(job_id, owner)
            while current is not None and current.status in ("pending", "processing"):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                if not self._listener.listening.is_set():
                    left = min(left, DEGRADED_RECHECK_S)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(waiter), left)
                if waiter.done():
                    waiters.discard(waiter)
                    waiter = asyncio.get_running_loop().create_future()
                    waiters.add(waiter)
                current = await self._store.get_job(job_id, owner)
            return current
        finally:
            if self._gauge is not None:
                self._gauge.dec()
            waiters.discard(waiter)
            if not waiters and self._waiting.get(job_id) is waiters:
                del self._waiting[job_id]

    def _ended(self, payload: str) -> None:
        try:
            job_id = uuid.UUID(payload)
        except ValueError:
            log.warning("unexpected job notification", payload=payload[:100])
            return
        for waiter in self._waiting.get(job_id, ()):
            if not waiter.done():
                waiter.set_result(None)

    def _wake_all(self) -> None:
        for waiters in self._waiting.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
