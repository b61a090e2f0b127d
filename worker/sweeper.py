"""Deletes expired results in bounded batches. Any number of replicas is safe: a session-level
advisory lock lets one of them sweep at a time."""

from __future__ import annotations

import asyncio

from shared.logging import get_logger
from shared.settings import Settings
from shared.store import Store

log = get_logger("ferry.sweeper")

SWEEPER_LOCK_KEY = 0x7377656570  # "sweep"


class Sweeper:
    def __init__(self, settings: Settings, store: Store) -> None:
        self._settings = settings
        self._store = store
        self.deleted_total = 0

    async def sweep_once(self) -> int | None:
        """One pass: delete every expired result, batch by batch. None if another replica
        holds the lock."""
        async with self._store.connection() as conn:
            if not await self._store.try_sweeper_lock(conn, SWEEPER_LOCK_KEY):
                return None
            try:
                deleted = 0
                while True:
                    n = await self._store.sweep_expired(self._settings.sweep_batch)
                    deleted += n
                    if n < self._settings.sweep_batch:
                        break
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", SWEEPER_LOCK_KEY)
        self.deleted_total += deleted
        if deleted:
            log.info("expired results deleted", deleted=deleted, total=self.deleted_total)
        return deleted

    async def run(self, stop: asyncio.Event) -> None:
        log.info("sweeper running", interval_s=self._settings.sweep_interval_s)
        while not stop.is_set():
            try:
                await self.sweep_once()
            except Exception:
                log.exception("sweep failed; will try again")
            try:
                await asyncio.wait_for(stop.wait(), self._settings.sweep_interval_s)
            except asyncio.TimeoutError:
                pass
