"""Writes history rows for sync and stream requests in batches, off the request's path."""

from __future__ import annotations

import asyncio

from shared.logging import get_logger
from shared.runtime import wait_set
from shared.store import HistoryRow, Store

log = get_logger("ferry.history")


class HistoryWriter:
    """Rows wait here, at most `linger_s` after the previous write, and go in one COPY: a
    worker serving 500 requests/s writes ~10 times a second, not once per request or two.
    History is best effort (the client already has its answer): a crash loses the rows not
    yet written, and their commit does not wait for the disk either."""

    def __init__(self, store: Store, *, batch: int = 500, interval_s: float = 0.5,
                 linger_s: float = 0.1) -> None:
        self._store = store
        self._batch = batch
        self._interval_s = interval_s
        self._linger_s = linger_s
        self._rows: asyncio.Queue[HistoryRow] = asyncio.Queue()

    def record(self, row: HistoryRow) -> None:
        self._rows.put_nowait(row)

    async def run(self, stop: asyncio.Event) -> None:
        while not (stop.is_set() and self._rows.empty()):
            try:
                first = await asyncio.wait_for(self._rows.get(), self._interval_s)
            except asyncio.TimeoutError:
                continue
            rows = [first]
            while len(rows) < self._batch and not self._rows.empty():
                rows.append(self._rows.get_nowait())
            try:
                await self._store.record_history(rows)
            except Exception:
                log.exception("could not record history", rows=len(rows))
            if self._rows.qsize() < self._batch:  # let the next batch gather
                await wait_set(stop, self._linger_s)
