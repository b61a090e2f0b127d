"""PostgreSQL LISTEN on a connection of its own, kept open across database restarts.

NOTIFY is delivered on commit to every listening session, so one UPDATE reaches every api
process at once. Notifications sent while the connection is down are lost: `on_connected`
runs after every (re)connect so the listener can refresh whatever it derived from them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import asyncpg

from shared.logging import get_logger
from shared.runtime import stop_task, wait_set
from shared.store import _TRANSIENT

log = get_logger("ferry.notify")

RETRY_S = 2.0


class Listener:
    def __init__(self, dsn: str, channel: str, on_notify: Callable[[str], None],
                 on_connected: Callable[[], None] = lambda: None, *,
                 connect_timeout_s: float = 10.0, retry_s: float = RETRY_S) -> None:
        self._dsn = dsn
        self._channel = channel
        self._on_notify = on_notify
        self._on_connected = on_connected
        self._connect_timeout_s = connect_timeout_s
        self._retry_s = retry_s
        self.listening = asyncio.Event()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Listener]:
        task = asyncio.create_task(self._run(), name=f"listen:{self._channel}")
        try:
            yield self
        finally:
            await stop_task(task)

    async def wait_listening(self, timeout_s: float) -> bool:
        return await wait_set(self.listening, timeout_s)

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        self._on_notify(payload)

    async def _run(self) -> None:
        while True:
            lost = asyncio.Event()
            try:
                conn = await asyncpg.connect(self._dsn, timeout=self._connect_timeout_s)
            except (*_TRANSIENT, asyncpg.PostgresError) as exc:
                log.debug("cannot listen yet", channel=self._channel, error=type(exc).__name__)
                await asyncio.sleep(self._retry_s)
                continue
            try:
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                await conn.add_listener(self._channel, self._notified)
                self.listening.set()
                self._on_connected()
                await lost.wait()
                log.warning("lost the database notifications; reconnecting",
                            channel=self._channel)
            except (*_TRANSIENT, asyncpg.PostgresError) as exc:
                log.warning("could not listen; retrying", channel=self._channel,
                            error=type(exc).__name__)
                await asyncio.sleep(self._retry_s)
            finally:
                self.listening.clear()
                if not conn.is_closed():
                    conn.terminate()
