"""The fake provider's memory: recorded calls and failure counts."""

from __future__ import annotations

import asyncio
import base64
from dataclasses import dataclass, field

from aiohttp import web

from fakeprovider.directives import Directives

# The headers kept in `Call.headers`, the short view; `raw_headers` has every one.
RECORDED_HEADERS = ("x-api-key", "authorization", "anthropic-version", "anthropic-beta")


@dataclass
class Call:
    """One recorded request; updated in place while it is answered."""

    id: str
    path: str
    model: str | None = None
    text: str | None = None
    stream: bool = False
    headers: dict[str, str] = field(default_factory=dict)
    status: int | None = None
    finished: bool = False
    cancelled: bool = False
    # Exactly what arrived, for tests that compare it with what a client sent.
    method: str = ""
    query: str = ""  # the raw query string, without `?`
    body_b64: str = ""
    raw_headers: list[tuple[str, str]] = field(default_factory=list)
    request_id: str = ""
    # The stream fault that struck (`error_after`, `drop_after`, `stall_after`) or `bad_json`.
    fault: str | None = None

    @classmethod
    def arrived(cls, request: web.Request, call_id: str, request_id: str, body: bytes) -> Call:
        # Latin-1 maps each byte to one character: `value.encode("latin-1")` gives the exact
        # bytes back, whatever encoding the client used.
        raw = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in request.raw_headers]
        return cls(
            id=call_id,
            path=request.path,
            headers={n: request.headers[n] for n in RECORDED_HEADERS if n in request.headers},
            method=request.method,
            query=request.rel_url.raw_query_string,
            body_b64=base64.b64encode(body).decode(),
            raw_headers=raw,
            request_id=request_id,
        )


@dataclass
class FakeState:
    calls: list[Call] = field(default_factory=list)
    # How many times each (path, prompt text) has failed, for `fail_times` / `fail_once`.
    failures: dict[tuple[str, str], int] = field(default_factory=dict)
    # Set when the server shuts down: releases streams held by `stall_after`.
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    def failure_status(self, path: str, text: str, directives: Directives) -> int | None:
        """The status this request must fail with, or None to answer normally."""
        status = directives.failure_status
        if status is None or directives.fail_times is None:
            return status
        key = (path, text)
        failed = self.failures.get(key, 0)
        if failed >= directives.fail_times:
            return None
        self.failures[key] = failed + 1
        return status

    def clear(self) -> None:
        """Forget calls and failure counts."""
        self.calls.clear()
        self.failures.clear()


STATE = web.AppKey("fake_state", FakeState)
