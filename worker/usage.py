"""Tokens per gateway key and minute, from the usage providers report: counted in memory and
added to PostgreSQL about once a second, where the api's per-key token limits read them."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from datetime import UTC, datetime

from shared.keystore import KeyStore
from shared.logging import get_logger
from shared.runtime import wait_set
from shared.store import StoreUnavailable

log = get_logger("ferry.usage")

FLUSH_S = 1.0
COUNTED = ("input_tokens", "output_tokens", "cache_creation_input_tokens")


class TokenMeter:
    def __init__(self, keystore: KeyStore) -> None:
        self._keys = keystore
        self._pending: Counter[tuple[uuid.UUID, datetime]] = Counter()

    def record(self, key_id: uuid.UUID | None, usage: dict[str, int]) -> None:
        tokens = sum(usage.get(name) or 0 for name in COUNTED)
        if key_id is None or tokens <= 0:
            return
        window = datetime.now(UTC).replace(second=0, microsecond=0)
        self._pending[(key_id, window)] += tokens

    async def flush(self) -> None:
        if not self._pending:
            return
        batch, self._pending = self._pending, Counter()
        try:
            await self._keys.add_tokens([(k, w, n) for (k, w), n in batch.items()])
        except StoreUnavailable:
            self._pending.update(batch)  # next time
            log.warning("could not record token usage yet; the database is unavailable")

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await wait_set(stop, FLUSH_S)
            await self.flush()
