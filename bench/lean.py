"""A lean HTTP/1.1 client for the generators' plain (not streamed) requests.

The generators share the machine's cores with what they measure, and aiohttp's client took
0.82 of 2 cores at 2,648 RPS (the overload row of bench/RESULTS.md, 2026-12-02). This one
writes the request's bytes, built once, and reads the status line, the headers up to
Content-Length and the body, over keep-alive connections: all a generator needs. Against an
aiohttp server in the same process (3,000 requests, CPU of both): 467 µs per request with
aiohttp's client, 241 µs with this one. A response without Content-Length (chunked) is an
error here: streams go through aiohttp's client.
"""

from __future__ import annotations

import asyncio
from collections import deque
from urllib.parse import urlsplit


def retry_after_seconds(value: str) -> float | None:
    """A Retry-After header's seconds; None for an HTTP date (not one Ferry sends) or junk."""
    try:
        return float(value)
    except ValueError:
        return None


class HTTPFailure(Exception):
    """The server's answer could not be read (kind: what went wrong)."""


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._waiter: asyncio.Future[tuple[int, float | None]] | None = None
        self._head_end = -1
        self._length = -1
        self._status = 0
        self._retry_after: float | None = None
        self._keep_alive = True
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(ConnectionResetError("the server closed the connection"))

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self._waiter is not None and not self._waiter.done():
            self._parse()

    def send(self, request: bytes, waiter: asyncio.Future[tuple[int, float | None]]) -> None:
        self._waiter = waiter
        self._head_end = self._length = -1
        assert self.transport is not None
        self.transport.write(request)
        if self._buffer:
            self._parse()

    def _parse(self) -> None:
        buffer = self._buffer
        if self._head_end < 0:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buffer[:end]).lower()
            try:
                self._status = int(head[9:12])
                at = head.index(b"\r\ncontent-length:") + 17
                stop = head.find(b"\r\n", at)
                self._length = int(head[at:] if stop < 0 else head[at:stop])
            except ValueError:
                self._fail("unreadable_response")
                return
            self._keep_alive = b"\r\nconnection: close" not in head
            self._retry_after = None
            if self._status >= 400 and (at := head.find(b"\r\nretry-after:")) >= 0:
                stop = head.find(b"\r\n", at + 14)
                self._retry_after = retry_after_seconds(
                    (head[at + 14:] if stop < 0 else head[at + 14:stop]).decode("latin-1"))
            self._head_end = end + 4
        total = self._head_end + self._length
        if len(buffer) < total:
            return
        del buffer[:total]
        waiter, self._waiter = self._waiter, None
        assert waiter is not None
        if not self._keep_alive:
            self.closed = True
            assert self.transport is not None
            self.transport.close()
        waiter.set_result((self._status, self._retry_after))

    def _fail(self, kind: str) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(HTTPFailure(kind))


class LeanClient:
    """POSTs one request (built once) over a pool of at most `limit` keep-alive connections."""

    def __init__(self, url: str, body: bytes, headers: dict[str, str], limit: int,
                 timeout: float) -> None:
        parts = urlsplit(url)
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 80
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        lines = [f"POST {path} HTTP/1.1", f"Host: {parts.netloc}",
                 f"Content-Length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in headers.items()
                  if k.lower() not in ("host", "content-length")]
        self._request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
        self._idle: deque[_Connection] = deque()
        self._slots = asyncio.Semaphore(limit)
        self._timeout = timeout

    async def post(self) -> tuple[int, float | None]:
        """The answer's status and retry-after (seconds, on an error status that has one);
        raises HTTPFailure, OSError or TimeoutError."""
        loop = asyncio.get_running_loop()
        async with self._slots:
            conn = None
            while self._idle:
                candidate = self._idle.pop()
                if not candidate.closed:
                    conn = candidate
                    break
            if conn is None:
                _, conn = await loop.create_connection(_Connection, self._host, self._port)
            waiter: asyncio.Future[tuple[int, float | None]] = loop.create_future()
            timer = loop.call_later(self._timeout, waiter.cancel)
            try:
                conn.send(self._request, waiter)
                answer = await waiter
            except asyncio.CancelledError:
                conn.closed = True
                if conn.transport is not None:
                    conn.transport.close()
                if loop.time() >= timer.when():  # the timer's cancel, not the caller's
                    raise TimeoutError("no answer in time") from None
                raise
            finally:
                timer.cancel()
            if not conn.closed:
                self._idle.append(conn)
            return answer

    def close(self) -> None:
        while self._idle:
            conn = self._idle.pop()
            if conn.transport is not None:
                conn.transport.close()
