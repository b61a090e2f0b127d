"""One AMQP connection at a time, to any node of a list, re-established whenever it is lost.

aio-pika's robust connection retries a single URL and restores channels on its own schedule.
Ferry needs more: move on to the next cluster node at once, tell waiting requests the moment
the connection is gone (they must not hang until it returns), and declare the topology and
consumers again on the new node. So the connection is plain, and this loop owns its life:

- `on_up(setup)`: coroutines run in order after every (re)connect, on the new connection;
- `on_down(callback)`: called as soon as the connection is lost, before any reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aio_pika
import aiormq
from aio_pika.abc import AbstractConnection

from shared.logging import get_logger
from shared.runtime import stop_task, wait_set

log = get_logger("ferry.amqp")

Setup = Callable[[AbstractConnection], Awaitable[None]]
Lost = Callable[[BaseException | None], None]

# What failing to reach or talk to a broker looks like from aio-pika.
CONNECT_ERRORS = (
    aiormq.exceptions.AMQPError,
    aio_pika.exceptions.ChannelInvalidStateError,
    ConnectionError,
    OSError,
    asyncio.TimeoutError,
    RuntimeError,  # aio-pika raises it for a closed connection or channel
)


def split_urls(value: str) -> list[str]:
    """`AMQP_URL` names one node or several, comma-separated (a cluster)."""
    urls = [part.strip() for part in value.split(",") if part.strip()]
    if not urls:
        raise ValueError("AMQP_URL names no broker")
    for url in urls:
        if urlsplit(url).scheme not in ("amqp", "amqps"):
            raise ValueError(f"AMQP_URL: {redact(url)!r} is not an amqp:// or amqps:// URL")
    return urls


def redact(url: str) -> str:
    """The URL without its password, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _with_heartbeat(url: str, heartbeat_s: int) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query.setdefault("heartbeat", str(heartbeat_s))
    return urlunsplit(parts._replace(query=urlencode(query)))


class Link:
    def __init__(self, urls: list[str], *, name: str, connect_timeout_s: float = 10.0,
                 heartbeat_s: int = 15, retry_max_s: float = 5.0) -> None:
        self._urls = [_with_heartbeat(u, heartbeat_s) for u in urls]
        self._name = name
        self._connect_timeout_s = connect_timeout_s
        self._retry_max_s = retry_max_s
        self._setups: list[Setup] = []
        self._lost_callbacks: list[Lost] = []
        self._connection: AbstractConnection | None = None
        self._up = asyncio.Event()
        self._first_result: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._next = 0
        self.connections = 0  # successful (re)connects, for tests and metrics

    def on_up(self, setup: Setup) -> None:
        self._setups.append(setup)

    def on_down(self, callback: Lost) -> None:
        self._lost_callbacks.append(callback)

    @property
    def connection(self) -> AbstractConnection | None:
        return self._connection if self._up.is_set() else None

    @property
    def is_up(self) -> bool:
        return self._up.is_set()

    @property
    def node(self) -> str:
        """The node in use (its URL without the password), for logs."""
        return redact(self._urls[(self._next - 1) % len(self._urls)])

    async def start(self, *, first_timeout_s: float | None = None) -> None:
        """Start the loop and wait for the first connection. Raises ConnectionError if no node
        answered within `first_timeout_s` (None: one try of each node)."""
        loop = asyncio.get_running_loop()
        self._first_result = loop.create_future()
        self._task = asyncio.create_task(self._run(), name=f"amqp-link:{self._name}")
        try:
            if first_timeout_s is None:
                await self._first_result
            else:
                await asyncio.wait_for(asyncio.shield(self._first_result), first_timeout_s)
        except BaseException:
            await self.close()
            raise

    async def wait_up(self, timeout_s: float) -> bool:
        return await wait_set(self._up, timeout_s)

    async def close(self) -> None:
        self._closing = True
        self._up.clear()
        if self._task is not None:
            await stop_task(self._task)
        connection, self._connection = self._connection, None
        if connection is not None and not connection.is_closed:
            with contextlib.suppress(*CONNECT_ERRORS):
                await asyncio.wait_for(connection.close(), 5)

    async def _run(self) -> None:
        failures = 0
        while not self._closing:
            url = self._urls[self._next % len(self._urls)]
            self._next += 1
            lost = asyncio.Event()
            try:
                connection = await self._connect(url, lost)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not isinstance(exc, CONNECT_ERRORS):
                    # A fault of the setup itself (say a queue declared with other arguments):
                    # fatal at start-up; later, keep trying in case someone fixes it.
                    if self._first_result is not None and not self._first_result.done():
                        self._first_result.set_exception(exc)
                        return
                    log.error("broker setup failed", node=redact(url), error=_describe(exc),
                              link=self._name)
                    await asyncio.sleep(self._retry_max_s)
                    continue
                failures += 1
                error = ConnectionError(f"{redact(url)}: {_describe(exc)}")
                tried_all = failures >= len(self._urls)
                if tried_all and self._first_result is not None \
                        and not self._first_result.done():
                    self._first_result.set_exception(error)
                log.warning("broker connection failed", node=redact(url),
                            error=_describe(exc), link=self._name)
                # Next node at once; a short backoff once every node has been tried.
                if failures % len(self._urls) == 0:
                    await asyncio.sleep(min(self._retry_max_s,
                                            0.25 * 2 ** (failures // len(self._urls))))
                continue
            failures = 0
            self._connection = connection
            self.connections += 1
            self._up.set()
            if self._first_result is not None and not self._first_result.done():
                self._first_result.set_result(None)
            log.info("broker connected", node=redact(url), link=self._name,
                     reconnect=self.connections > 1)
            await lost.wait()
            self._connection = None
            if not self._closing:
                log.warning("broker connection lost; reconnecting", node=redact(url),
                            link=self._name)

    async def _connect(self, url: str, lost: asyncio.Event) -> AbstractConnection:
        connection = await aio_pika.connect(
            url, timeout=self._connect_timeout_s,
            client_properties={"connection_name": self._name},
        )

        def closed(_sender: object, exc: BaseException | None = None) -> None:
            if lost.is_set():
                return
            lost.set()
            was_up = self._up.is_set()
            self._up.clear()
            if was_up and not self._closing:
                for callback in self._lost_callbacks:
                    callback(exc)

        connection.close_callbacks.add(closed)
        try:
            for setup in self._setups:
                await asyncio.wait_for(setup(connection), self._connect_timeout_s * 3)
        except BaseException:
            lost.set()
            with contextlib.suppress(*CONNECT_ERRORS):
                await asyncio.wait_for(connection.close(), 5)
            raise
        return connection


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
