"""Sync and streaming requests: publish to the interactive lane, relay the worker's replies.

The api never calls a provider. It waits (bounded) for a worker's first reply (the answer
itself, or "started" for a request that takes longer), then relays the message, or each
stream event as it arrives, to the client, with the provider's response headers. Every way
this can go wrong ends the client's request at once with Anthropic's error envelope (or an
`error` event once a stream has begun), and tells the worker to stop: a lost broker
connection, a worker that goes quiet, a deadline.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

from aiohttp import web

from api.responses import FERRY_REQUEST_ID, REQUEST_ID, json_bytes
from api.state import ADMISSION, BROKER, PROVIDER_SECONDS, REPLIES, REQUEST_ID_KEY, SETTINGS
from shared.errors import FerryError, Overloaded, Unavailable
from shared.jobs import JobEnvelope, Reply
from shared.logging import get_logger
from shared.settings import Settings
from shared.wire import ErrorEnvelope

log = get_logger("ferry.api")

PING = b'event: ping\ndata: {"type":"ping"}\n\n'
BROKER_LOST = "lost the connection to the message broker; retry"
# A worker serving a sync request repeats "started" this often until it answers; silent for
# SILENT_AFTER times that, it is taken for dead (killed, or its machine gone) and the client
# gets a 503 at once instead of a 504 at the request deadline. Its message may come back from
# the broker to another worker, which then answers 503 too (the api has stopped listening by
# then); after the pickup timeout the broker drops it instead.
KEEPALIVE_S = 5.0
SILENT_AFTER = 3
WORKER_GONE = "the worker serving this request stopped answering; retry"


class _Timeout(FerryError):
    status = 504
    error_type = "timeout_error"


async def serve_interactive(request: web.Request, envelope: JobEnvelope) -> web.StreamResponse:
    """Serve an interactive request the caller has admitted (api/admission.py)."""
    settings = request.app[SETTINGS]
    broker = request.app[BROKER]
    replies = request.app[REPLIES]
    admission = request.app[ADMISSION]
    if not broker.is_connected:
        raise Unavailable(BROKER_LOST)
    started = time.monotonic()
    job_id = envelope.job_id
    inbox = replies.open(job_id)
    admission.published(job_id)
    admission.in_flight += 1
    completed = False  # the worker said it is done: nothing to cancel
    try:
        await broker.publish_interactive(envelope)
        first = await _next(inbox, settings.pickup_timeout_s)
        if first is not None:
            admission.answered(job_id)
        if first is None:
            raise Overloaded(f"no worker took the request within {settings.pickup_timeout_s:g} s;"
                             " retry later", headers={"retry-after": "1"})
        # A worker sends "started" only for a request it is still serving moments later;
        # otherwise its first reply is already the answer (or a stream's first event).
        if first.kind in ("message", "error"):
            completed = True
            return _final(request, first)
        early = None if first.kind == "started" else first
        deadline = started + settings.request_timeout_s
        if envelope.stream:
            response, completed = await _relay_stream(request, inbox, settings, deadline,
                                                      early)
            return response
        reply = early or await _answer(inbox, deadline, first.alive_s, settings)
        completed = True
        return _final(request, reply)
    finally:
        admission.in_flight -= 1
        admission.settled(job_id)
        replies.close(job_id)
        if not completed:
            # Client gone, timed out or failed: the worker must not spend tokens for nobody.
            await asyncio.shield(broker.publish_cancel(job_id))


async def _answer(inbox: asyncio.Queue[Reply], deadline: float, alive_s: float | None,
                  settings: Settings) -> Reply:
    """The reply after "started". `alive_s`: the worker repeats "started" that often (a worker
    that does not, an older one, is waited for until the deadline)."""
    while True:
        left = deadline - time.monotonic()
        silence = alive_s * SILENT_AFTER if alive_s is not None else left
        watching = silence < left  # else the deadline comes first
        reply = await _next(inbox, min(silence, left))
        if reply is None:
            if watching:
                raise Unavailable(WORKER_GONE)
            raise _Timeout(f"no answer within {settings.request_timeout_s:g} s")
        if reply.kind != "started":
            return reply


async def _next(inbox: asyncio.Queue[Reply], within_s: float) -> Reply | None:
    if not inbox.empty():
        return inbox.get_nowait()
    try:
        # asyncio.timeout, not wait_for: no task of its own per wait (Python 3.11).
        async with asyncio.timeout(max(within_s, 0)):
            return await inbox.get()
    except TimeoutError:
        return None


def _final(request: web.Request, reply: Reply) -> web.Response:
    if reply.provider_seconds is not None:
        request[PROVIDER_SECONDS] = reply.provider_seconds
    if reply.kind == "message":
        return json_bytes(reply.body, headers=_headers(reply.headers))
    if reply.kind == "error":
        if not reply.body:
            raise Unavailable(BROKER_LOST)
        return json_bytes(reply.body, status=reply.status or 500,
                          headers=_headers(reply.headers))
    raise Unavailable(f"unexpected reply {reply.kind!r} from the worker")


def _headers(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    return dict(pairs)


async def _relay_stream(request: web.Request, inbox: asyncio.Queue[Reply], settings: Settings,
                        deadline: float, first: Reply | None
                        ) -> tuple[web.StreamResponse, bool]:
    """Hold the status line until the first event (`first`, if it came already), so a
    provider error before any output is still a proper HTTP error; then write each event as
    it comes. Returns the response and whether the worker finished (False: Ferry ended the
    stream, so the worker must stop)."""
    reply = first or await _next(inbox, min(settings.stream_idle_timeout_s,
                                            deadline - time.monotonic()))
    if reply is None:
        raise _Timeout("the provider sent nothing in time")
    if reply.kind != "event":
        return _final(request, reply), True

    ferry_id = request.get(REQUEST_ID_KEY, "")
    headers = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no", REQUEST_ID: ferry_id, FERRY_REQUEST_ID: ferry_id}
    headers.update(reply.headers)
    response = web.StreamResponse(headers=headers)
    await response.prepare(request)
    last_event = time.monotonic()
    completed = False
    while True:
        if reply is not None:
            if reply.kind == "event":
                await response.write(_sse(reply))
                last_event = time.monotonic()
                if reply.event == "error":  # nothing follows an error event
                    completed = True
                    break
            elif reply.kind == "end":
                completed = True
                break
            else:  # an error after the stream began: an SSE error event, then the end
                await response.write(_sse_error(reply))
                completed = bool(reply.body)  # an empty body: the broker went, not the worker
                break
        now = time.monotonic()
        if now >= deadline:
            await response.write(_sse_error_of("timeout_error", "request deadline exceeded"))
            break
        if now - last_event >= settings.stream_idle_timeout_s:
            await response.write(_sse_error_of("timeout_error", "the provider stream went idle"))
            break
        wait = min(settings.ping_interval_s, deadline - now,
                   last_event + settings.stream_idle_timeout_s - now)
        reply = await _next(inbox, wait)
        if reply is None and time.monotonic() - last_event >= settings.ping_interval_s:
            await response.write(PING)  # keep proxies from cutting a long silent stream
    await response.write_eof()
    return response, completed


def _sse(reply: Reply) -> bytes:
    return b"event: " + (reply.event or "message").encode() + b"\ndata: " + reply.body + b"\n\n"


def _sse_error(reply: Reply) -> bytes:
    if reply.kind == "error" and reply.body:
        return b"event: error\ndata: " + reply.body + b"\n\n"
    return _sse_error_of("api_error", BROKER_LOST)


def _sse_error_of(error_type: str, message: str) -> bytes:
    return b"event: error\ndata: " + ErrorEnvelope.of(error_type, message).to_json() + b"\n\n"
