"""Deletes expired results, and history past its retention, in bounded batches. Any number of
replicas is safe: a session-level advisory lock lets one of them sweep at a time."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from shared.batchstore import BatchStore
from shared.keystore import KeyStore
from shared.logging import get_logger
from shared.metrics import Metrics
from shared.runtime import wait_set
from shared.settings import Settings
from shared.store import Store

log = get_logger("ferry.sweeper")

SWEEPER_LOCK_KEY = 0x7377656570  # "sweep"
USAGE_KEPT_S = 3600.0  # per-minute key usage is only needed for the current minute


class Sweeper:
    def __init__(self, settings: Settings, store: Store, metrics: Metrics | None = None) -> None:
        self._settings = settings
        self._store = store
        self._metrics = metrics or Metrics()
        self.deleted_total = 0

    async def sweep_once(self) -> int | None:
        """One pass: delete every expired result, batch by batch. None if another replica
        holds the lock."""
        async with self._store.advisory_lock(SWEEPER_LOCK_KEY) as mine:
            if not mine:
                return None
            deleted = await self._drain(self._store.sweep_expired)
            self._metrics.swept.inc(deleted)
            keys = await self._drain(self._store.sweep_idempotency_keys)
            batches = await self._drain(lambda batch: BatchStore(self._store).sweep(
                self._settings.batch_retention_s, batch))
            await KeyStore(self._store).prune_usage(USAGE_KEPT_S)
            pruned = 0
            if self._settings.history_retention_days:
                retention_s = self._settings.history_retention_days * 86400
                pruned = await self._drain(
                    lambda batch: self._store.prune_history(retention_s, batch))
                self._metrics.history_pruned.inc(pruned)
        self.deleted_total += deleted
        if deleted or pruned or keys or batches:
            log.info("sweep done", results_deleted=deleted, history_pruned=pruned,
                     idempotency_keys_deleted=keys, batches_deleted=batches,
                     results_deleted_total=self.deleted_total)
        return deleted

    async def _drain(self, delete_batch: Callable[[int], Awaitable[int]]) -> int:
        """Delete batch after batch (each its own short transaction) until one comes up short."""
        total = 0
        while True:
            n = await delete_batch(self._settings.sweep_batch)
            total += n
            if n < self._settings.sweep_batch:
                return total

    async def run(self, stop: asyncio.Event) -> None:
        log.info("sweeper running", interval_s=self._settings.sweep_interval_s)
        while not stop.is_set():
            try:
                await self.sweep_once()
            except Exception:
                log.exception("sweep failed; will try again")
            await wait_set(stop, self._settings.sweep_interval_s)
