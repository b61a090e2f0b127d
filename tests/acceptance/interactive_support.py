"""Helpers for the sync/stream and provider acceptance tests: raw SSE reads, an extra api
process on a running stack, a stack with a providers file, history rows, and a recording proxy
in front of the fake provider.

Kept apart from stack.py / support.py (owned elsewhere); everything here builds on them.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
from aiohttp import web

from tests.acceptance.stack import Stack, running_stack
from tests.conftest import TestRun, connect_any
from tests.support import free_port

# PostgreSQL's connection limit (100 by default) is shared by every stack of a run, and of
# concurrent runs: Ferry's default pool (20 per process) would exhaust it. Small pools suffice.
SMALL_POOLS = {"FERRY_DB_POOL_SIZE": "4"}

CLIENT_KEY = "client-key-a"
FERRY_HEADERS = {"x-api-key": CLIENT_KEY, "anthropic-version": "2023-06-01",
                 "content-type": "application/json"}

_FRAME = re.compile(rb"event: ([a-z_]+)\ndata: (\{.*\})", re.DOTALL)


def echo(text: str) -> str:
    """The fake provider's answer to `text`: its words without the directives."""
    return "echo: " + " ".join(w for w in text.split() if not w.startswith("[[fake:"))


def unique_model(prefix: str) -> str:
    """A model name of this test's own: the fake answers any, and history rows are found by it."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


# --- raw SSE ------------------------------------------------------------------------------------


@dataclass
class RawStream:
    status: int
    content_type: str
    body: bytes


async def post_raw(url: str, body: bytes, headers: dict[str, str] | None = None) -> RawStream:
    """POST and read the whole answer as bytes (no SDK in between)."""
    async with aiohttp.ClientSession() as http, \
            http.post(url, data=body, headers=headers or FERRY_HEADERS) as resp:
        return RawStream(resp.status, resp.headers.get("Content-Type", ""), await resp.read())


def parse_sse(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """(event, data) per frame. Strict: every frame is exactly `event: X\\ndata: {json}`
    followed by a blank line, and the data's `type` repeats the event name."""
    assert raw.endswith(b"\n\n"), raw[-200:]
    events = []
    for frame in raw[:-2].split(b"\n\n"):
        match = _FRAME.fullmatch(frame)
        assert match is not None, f"malformed SSE frame: {frame!r}"
        name, data = match.group(1).decode(), orjson.loads(match.group(2))
        assert data["type"] == name, frame
        events.append((name, data))
    return events


def without_ids(raw: bytes) -> bytes:
    """The stream with its per-call ids (the message's, each tool_use block's) replaced by
    placeholders, so two calls for the same prompt can be compared byte for byte."""
    events = parse_sse(raw)
    assert events[0][0] == "message_start", events[0]
    ids = [events[0][1]["message"]["id"]]
    ids += [data["content_block"]["id"] for name, data in events
            if name == "content_block_start" and data["content_block"]["type"] == "tool_use"]
    for n, id_ in enumerate(ids):
        raw = raw.replace(id_.encode(), b"ID%d" % n)
    return raw


# --- processes on a running stack ---------------------------------------------------------------


async def start_extra_api(stack: Stack, name: str, **settings: str) -> str:
    """Another `ferry api` of the stack (same broker namespace and database) with some
    settings changed; returns its base URL. Several api replicas are a normal deployment."""
    port = free_port()
    stack.start(name, "api", env=stack.env(FERRY_PORT=str(port), **settings))
    url = f"http://127.0.0.1:{port}"
    await stack.wait_ready(name, f"{url}/readyz")
    return url


async def queue_depth(stack: Stack, queue: str) -> int:
    """Messages ready in `<namespace>.<queue>` (not counting those a worker holds)."""
    connection = await connect_any(stack.broker_url)
    try:
        channel = await connection.channel()
        declared = await channel.declare_queue(f"{stack.namespace}.{queue}", passive=True)
        return declared.declaration_result.message_count or 0
    finally:
        await connection.close()


# --- database -----------------------------------------------------------------------------------


async def fetch(database_url: str, query: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url)
    try:
        rows: list[asyncpg.Record] = await conn.fetch(query, *args)
        return rows
    finally:
        await conn.close()


async def history_rows(database_url: str, model: str) -> list[asyncpg.Record]:
    return await fetch(database_url, "SELECT * FROM jobs WHERE model = $1 ORDER BY submitted_at",
                       model)


# --- a stack with a providers file -----------------------------------------------------------


@asynccontextmanager
async def providers_stack(run: TestRun, log_dir: Path, suffix: str,
                          providers_toml: Callable[[Stack], str], *, workers: int = 1,
                          env: dict[str, str] | None = None,
                          sweeper: bool = False) -> AsyncIterator[Stack]:
    """running_stack, plus FERRY_PROVIDERS_FILE written from `providers_toml(stack)` before
    any process starts (the file needs the fake provider's URL, which the Stack picks)."""
    path = log_dir / "providers.toml"

    def write_providers(stack: Stack) -> None:
        path.write_text(providers_toml(stack))
        stack.settings_env["FERRY_PROVIDERS_FILE"] = str(path)

    async with running_stack(run, log_dir, suffix, workers=workers, env=env,
                             before_start=write_providers, sweeper=sweeper) as stack:
        yield stack


# --- a recording proxy --------------------------------------------------------------------------


@dataclass
class Recorder:
    """Request bodies as an upstream received them (the fake provider records no bodies)."""

    url: str = ""
    upstream: str = ""  # where requests are forwarded; may be set after the proxy started
    bodies: list[dict[str, Any]] = field(default_factory=list)

    def for_text(self, text: str) -> list[dict[str, Any]]:
        return [b for b in self.bodies if text in orjson.dumps(b.get("messages")).decode()]


@asynccontextmanager
async def recording_proxy() -> AsyncIterator[Recorder]:
    """An HTTP server in this process that records each JSON body and forwards the request to
    `recorder.upstream`, answering with the upstream's status, content type and body (a stream
    arrives whole, which is still a valid stream)."""
    recorder = Recorder()
    session = aiohttp.ClientSession()
    passed = ("content-type", "x-api-key", "authorization", "anthropic-version",
              "anthropic-beta")

    async def forward(request: web.Request) -> web.Response:
        body = await request.read()
        recorder.bodies.append(orjson.loads(body))
        headers = {k: v for k, v in request.headers.items() if k.lower() in passed}
        async with session.post(recorder.upstream + request.path, data=body,
                                headers=headers) as resp:
            answer = await resp.read()
            out = {k: v for k, v in resp.headers.items()
                   if k.lower() in ("retry-after", "content-type")}
            return web.Response(status=resp.status, body=answer, headers=out)

    app = web.Application()
    app.router.add_post("/{tail:.*}", forward)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        recorder.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        yield recorder
    finally:
        await runner.cleanup()
        await session.close()


async def gather_bounded(limit: int, *coros: Any) -> list[Any]:
    """asyncio.gather with at most `limit` running at once."""
    slots = asyncio.Semaphore(limit)

    async def one(coro: Any) -> Any:
        async with slots:
            return await coro

    return await asyncio.gather(*(one(c) for c in coros))
