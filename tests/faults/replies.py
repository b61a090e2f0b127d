"""Sync and streaming requests, recorded event by event, for the reply-channel faults."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from tests.faults.faultkit import API_KEY, MESSAGES, decode, is_error_envelope
from tests.support import request_body


@dataclass(eq=False)  # each request is itself, however alike two look
class Interactive:
    """One sync or streaming request and how it ended."""

    text: str
    stream: bool
    sent_at: float = field(default_factory=time.monotonic)
    status: int | None = None
    body: Any = None  # for an answer that is not an event stream
    events: list[tuple[str, Any]] = field(default_factory=list)  # (event, data) of a stream
    ended_at: float | None = None
    error: str | None = None

    @property
    def started(self) -> bool:
        """A stream whose first event reached the client."""
        return bool(self.events)

    def ended_with_error(self, status: int) -> bool:
        """`status` with an error envelope, or a begun stream whose last event is an error
        event carrying one."""
        if self.status == status and is_error_envelope(self.body):
            return True
        return (self.status == 200 and self.stream and bool(self.events)
                and self.events[-1][0] == "error" and is_error_envelope(self.events[-1][1]))

    def describe(self) -> str:
        last = self.events[-1][0] if self.events else None
        return (f"{'stream' if self.stream else 'sync'} {self.status or self.error}"
                f" {str(self.body)[:100] if self.body is not None else ''}"
                f"{f' events={len(self.events)} last={last}' if self.events else ''}")


async def send_interactive(http: aiohttp.ClientSession, base_url: str, request: Interactive,
                           *, api_key: str = API_KEY, timeout: float = 120.0) -> Interactive:  # noqa: ASYNC109
    """Send `request` and record its answer, event by event for a stream."""
    headers = {"x-api-key": api_key, "content-type": "application/json"}
    body = request_body(request.text, stream=True) if request.stream else request_body(
        request.text)
    try:
        async with http.post(base_url + MESSAGES, data=body, headers=headers,
                             timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            request.status = resp.status
            if resp.content_type != "text/event-stream":
                request.body = decode(await resp.read())
                return request
            event = "message"
            async for raw in resp.content:
                line = raw.decode().rstrip("\r\n")
                if line.startswith("event:"):
                    event = line.removeprefix("event:").strip()
                elif line.startswith("data:"):
                    request.events.append((event, decode(line.removeprefix("data:").encode())))
    except TimeoutError:
        request.error = f"no answer within {timeout:g}s"
    except aiohttp.ClientError as exc:
        request.error = f"{type(exc).__name__}: {exc}"
    finally:
        request.ended_at = time.monotonic()
    return request
