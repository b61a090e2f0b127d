"""The one interface every provider adapter implements."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from shared.wire import ErrorEnvelope, error_type_for_status

RETRYABLE_STATUSES = frozenset({408, 409, 429})  # and 5xx (incl. 529 and CDN 52x) but:
NEVER_RETRYABLE_5XX = frozenset({501, 505})  # "not implemented" will not change on a retry


@dataclass(frozen=True, slots=True)
class CallContext:
    """Per-call facts the client sent that the provider must see."""

    anthropic_version: str | None = None
    anthropic_beta: str | None = None
    api_key: str | None = None  # picked per call from the provider's key pool


@dataclass(frozen=True, slots=True)
class ProviderResponse:
    """A successful answer: the Anthropic Message as JSON bytes, and its parsed usage."""

    body: bytes
    stop_reason: str | None = None
    usage: dict[str, int] = field(default_factory=dict)


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
    same call again may succeed; `retry_after` is the provider's hint in seconds."""

    def __init__(self, status: int, error_type: str | None, message: str, *,
                 retryable: bool | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type or error_type_for_status(status)
        self.message = message
        if retryable is None:
            retryable = status in RETRYABLE_STATUSES or (
                status >= 500 and status not in NEVER_RETRYABLE_5XX)
        self.retryable = retryable
        self.retry_after = retry_after

    def envelope(self) -> ErrorEnvelope:
        return ErrorEnvelope.of(self.error_type, self.message)


@dataclass(frozen=True, slots=True)
class SSEEvent:
    """One Server-Sent Event in Anthropic's stream format: `event: {event}\ndata: {data}\n\n`.
    `data` is the JSON text exactly as it will be sent to the client."""

    event: str
    data: bytes

    def encode(self) -> bytes:
        return b"event: " + self.event.encode() + b"\ndata: " + self.data + b"\n\n"


class Provider(Protocol):
    name: str

    async def create_message(self, body: bytes, ctx: CallContext) -> ProviderResponse:
        """Send a non-streaming Messages request (`body` is the Anthropic request JSON with the
        model already set to the upstream model); raise ProviderError on failure."""
        ...

    def stream_message(self, body: bytes, ctx: CallContext) -> AsyncIterator[SSEEvent]:
        """Send a streaming request and yield Anthropic stream events as they arrive.
        Raises ProviderError before the first event if the call fails; a failure after it is
        yielded as an `error` event and the iterator ends."""
        ...
