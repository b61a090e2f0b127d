"""The fake provider's memory: recorded calls, failure counts and the rate limiter."""

from __future__ import annotations

import asyncio
import base64
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from fakeprovider.directives import Directives
from fakeprovider.ratelimit import Limiter, presented_key

# The headers kept in `Call.headers`, the short view; `raw_headers` has every one.
RECORDED_HEADERS = ("x-api-key", "authorization", "anthropic-version", "anthropic-beta")
NO_KEY_LABEL = "(no key)"


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
    limiter: Limiter = field(default_factory=Limiter)
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
        """Forget calls and failure counts; the rate-limit configuration stays."""
        self.calls.clear()
        self.failures.clear()

    def stats(self) -> dict[str, Any]:
        """Counts of the recorded calls: per status, per path and per presented key."""
        by_status: Counter[str] = Counter()
        by_path: Counter[str] = Counter()
        by_key: dict[str, Counter[str]] = {}
        for call in self.calls:
            status = "none" if call.status is None else str(call.status)
            by_status[status] += 1
            by_path[call.path] += 1
            key = presented_key(call.headers) or NO_KEY_LABEL
            by_key.setdefault(key, Counter())[status] += 1
        return {
            "calls": len(self.calls),
            "finished": sum(c.finished for c in self.calls),
            "cancelled": sum(c.cancelled for c in self.calls),
            "by_status": dict(by_status),
            "by_path": dict(by_path),
            "by_key": {key: dict(counts) for key, counts in by_key.items()},
        }


STATE = web.AppKey("fake_state", FakeState)
