"""The one interface every provider adapter implements, and what adapters share: errors, the
response headers relayed to clients, and Server-Sent Events parsing."""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import AsyncGenerator, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import aiohttp

from shared.wire import ErrorEnvelope, error_type_for_status

RETRYABLE_STATUSES = frozenset({408, 409, 429})  # and 5xx (incl. 529 and CDN 52x) but:
NEVER_RETRYABLE_5XX = frozenset({501, 505})  # "not implemented" will not change on a retry

Headers = tuple[tuple[str, str], ...]

# Provider response headers a client should see (the SDKs read them to back off).
_RELAYED = re.compile(r"^(request-id|retry-after|retry-after-ms|anthropic-ratelimit-[a-z-]+)$")
_MAX_HEADER_VALUE = 1024
# One SSE event may carry a large tool input or text delta; beyond this it is an error.
MAX_SSE_EVENT_BYTES = 32 * 1024 * 1024


def relayed_headers(headers: Iterable[tuple[str, str]]) -> Headers:
    """The provider's response headers Ferry passes on: its request id, rate-limit state and
    retry hints."""
    out = []
    for name, value in headers:
        lower = name.lower()
        if _RELAYED.match(lower) and len(value) <= _MAX_HEADER_VALUE and value.isascii():
            out.append((lower, value))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class CallContext:
    """Per-call facts the client sent that the provider must see."""

    forward_headers: Headers = ()  # anthropic-version, anthropic-beta, other anthropic-*
    query: str = ""  # the client's query string (`beta=true`)
    api_key: str | None = None  # picked per call from the provider's key pool

    def header(self, name: str) -> str | None:
        return next((v for n, v in self.forward_headers if n == name), None)


@dataclass(frozen=True, slots=True)
class ProviderResponse:
    """A successful answer: the Anthropic Message (or other JSON) as bytes, its parsed usage,
    and the response headers to relay."""

    body: bytes
    stop_reason: str | None = None
    usage: dict[str, int] = field(default_factory=dict)
    headers: Headers = ()


def parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None  # an HTTP date: rare from LLM providers; fall back to our own backoff
    if not math.isfinite(seconds):
        return None  # "nan" would make the backoff sleep forever
    return max(seconds, 0.0)


class ProviderError(Exception):
    """A failed call. `status` is what the client should see; `retryable` says if trying the
    same call again may succeed; `retry_after` is the provider's hint in seconds. `body` is the
    provider's own error body when it sent one in Anthropic's format: relayed verbatim."""

    def __init__(self, status: int, error_type: str | None, message: str, *,
                 retryable: bool | None = None, retry_after: float | None = None,
                 body: bytes | None = None, headers: Headers = ()) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type or error_type_for_status(status)
        self.message = message
        if retryable is None:
            retryable = status in RETRYABLE_STATUSES or (
                status >= 500 and status not in NEVER_RETRYABLE_5XX)
        self.retryable = retryable
        self.retry_after = retry_after
        self.body = body
        self.headers = headers

    def envelope(self, request_id: str | None = None) -> ErrorEnvelope:
        return ErrorEnvelope.of(self.error_type, self.message, request_id)

    def to_json(self, request_id: str | None = None) -> bytes:
        """The error body for the client: the provider's own when it sent one (with the
        provider's request id), else Ferry's envelope with Ferry's request id."""
        return self.body if self.body is not None else self.envelope(request_id).to_json()


def unreachable(provider: str, exc: BaseException) -> ProviderError:
    """A transport failure, named by its class only: addresses and library text stay in logs."""
    if isinstance(exc, asyncio.TimeoutError):
        return ProviderError(504, "timeout_error",
                             f"provider `{provider}` did not answer in time", retryable=True)
    return ProviderError(502, "api_error",
                         f"could not reach provider `{provider}` ({type(exc).__name__})",
                         retryable=True)


TRANSPORT_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, OSError)


def leftover(content: aiohttp.StreamReader) -> bytes:
    """Bytes that arrived together with a broken transfer. aiohttp raises the transfer error
    before handing over data already buffered, so the last events an upstream sent before
    dropping the connection would be lost; they are taken here, through aiohttp's private
    `_read_nowait` (test_stream_faults covers it, should aiohttp change)."""
    try:
        return content._read_nowait(-1) if content._buffer else b""
    except Exception:
        return b""


@dataclass(frozen=True, slots=True)
class SSEEvent:
    """One Server-Sent Event in Anthropic's stream format: `event: {event}\ndata: {data}\n\n`.
    `data` is the JSON text exactly as it will be sent to the client."""

    event: str
    data: bytes
    headers: Headers = ()  # the provider's response headers, on the first event only

    def encode(self) -> bytes:
        return b"event: " + self.event.encode() + b"\ndata: " + self.data + b"\n\n"


_EOL = re.compile(rb"\r\n|\r|\n")


class SSEParser:
    """Incremental SSE parsing (WHATWG line rules): bytes in, complete events out. Lines of any
    length are fine up to `max_event_bytes` per event (then ValueError)."""

    def __init__(self, max_event_bytes: int = MAX_SSE_EVENT_BYTES) -> None:
        self._buffer = b""
        self._event: str | None = None
        self._data: list[bytes] = []
        self._size = 0
        self._max = max_event_bytes

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        self._buffer += chunk
        events: list[SSEEvent] = []
        pos = 0
        while (match := _EOL.search(self._buffer, pos)) is not None:
            if match.group() == b"\r" and match.end() == len(self._buffer):
                break  # perhaps the first half of a CRLF split across reads
            self._line(self._buffer[pos:match.start()], events)
            pos = match.end()
        self._buffer = self._buffer[pos:]
        if len(self._buffer) + self._size > self._max:
            raise ValueError(f"an event larger than {self._max} bytes")
        return events

    def close(self) -> list[SSEEvent]:
        events: list[SSEEvent] = []
        if self._buffer:
            self._line(self._buffer, events)
            self._buffer = b""
        self._line(b"", events)
        return events

    def _line(self, line: bytes, events: list[SSEEvent]) -> None:
        if not line:
            if self._data:
                events.append(SSEEvent(self._event or "message", b"\n".join(self._data)))
            self._event, self._data, self._size = None, [], 0
        elif line.startswith(b"event:"):
            self._event = line[6:].strip().decode(errors="replace")
        elif line.startswith(b"data:"):
            value = line[5:]
            value = value[1:] if value.startswith(b" ") else value
            self._data.append(value)
            self._size += len(value)
            if self._size > self._max:
                raise ValueError(f"an event larger than {self._max} bytes")


class Provider(Protocol):
    name: str

    async def create_message(self, body: bytes, ctx: CallContext) -> ProviderResponse:
        """Send a non-streaming Messages request (`body` is the Anthropic request JSON with the
        model already set to the upstream model); raise ProviderError on failure."""
        ...

    def stream_message(self, body: bytes, ctx: CallContext) -> AsyncGenerator[SSEEvent, None]:
        """Send a streaming request and yield Anthropic stream events as they arrive.
        Raises ProviderError before the first event if the call fails; a failure after it is
        yielded as an `error` event and the iterator ends."""
        ...

    async def count_tokens(self, body: bytes, ctx: CallContext) -> ProviderResponse:
        """POST /v1/messages/count_tokens with the client's body."""
        ...

    async def list_models(self, ctx: CallContext) -> list[dict[str, object]]:
        """The provider's own models, in Anthropic's model shape (may be empty)."""
        ...
