"""Small helpers shared by the integration and acceptance tests."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aiohttp
import orjson

T = TypeVar("T")

MODEL = "claude-test-model"


async def eventually(
    probe: Callable[[], Awaitable[T | None]],
    *,
    timeout: float = 15.0,  # noqa: ASYNC109 -- a deadline for polling, not a cancel scope
    interval: float = 0.05,
    what: str = "the condition",
) -> T:
    """Await `probe()` until it returns something truthy, and return that. The timeout only
    bounds a hang; it is generous on purpose and asserts nothing about speed."""
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout}s waiting for {what}; last: {value!r}")
        await asyncio.sleep(interval)


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port free now and never handed out before in this run: the kernel may offer a
    just-closed port again, and two services of one stack (chosen before either binds) would
    then share it."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def request_body(text: str, *, model: str = MODEL, max_tokens: int = 64,
                 **extra: Any) -> bytes:
    """An Anthropic Messages request whose last user message is `text`."""
    return orjson.dumps({
        "model": model, "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": text}], **extra,
    })


async def fake_calls(base_url: str, text: str | None = None) -> list[dict[str, Any]]:
    """The fake provider's recorded calls (GET /_fake/calls), only those for `text` if given."""
    async with aiohttp.ClientSession() as http, http.get(f"{base_url}/_fake/calls") as resp:
        assert resp.status == 200, await resp.text()
        calls: list[dict[str, Any]] = await resp.json()
    return calls if text is None else [c for c in calls if c["text"] == text]
