"""Sync and streaming requests: publish to the interactive lane, relay the worker's replies.

The api never calls a provider. It waits (bounded) for a worker to say it started, then relays
the message, or each stream event as it arrives, to the client.
"""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from api.envelope import build_envelope
from api.keys import BROKER, PROVIDER_SECONDS, REPLIES, REQUEST_ID_KEY, SETTINGS
from api.responses import REQUEST_ID, json_bytes
from shared.errors import FerryError, Overloaded, Unavailable
from shared.jobs import Reply
from shared.logging import get_logger
from shared.settings import Settings
from shared.wire import ErrorEnvelope, MessagesRequest

log = get_logger("ferry.api")

PING = b'event: ping\ndata: {"type":"ping"}\n\n'


class _Timeout(FerryError):
    status = 504
    error_type = "timeout_error"


async def serve_interactive(request: web.Request, body: bytes, message_request: MessagesRequest,
                            caller: bytes) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    broker = request.app[BROKER]
    replies = request.app[REPLIES]
    stream = bool(message_request.stream)
    started = time.monotonic()
    envelope = build_envelope(
        request, body, message_request, "stream" if stream else "sync",
        reply_to=replies.reply_to, caller_hash=caller,
        pickup_deadline=time.time() + settings.pickup_timeout_s,
    )
    job_id = envelope.job_id
    inbox = replies.open(job_id)
    finished = False
    try:
        await broker.publish_interactive(envelope)
        first = await _next(inbox, settings.pickup_timeout_s)
        if first is None:
            raise Overloaded(f"no worker took the request within {settings.pickup_timeout_s:g} s;"
                             " retry later")
        if first.kind != "started":
            return _final(request, first)
        deadline = started + settings.request_timeout_s
        if stream:
            response = await _relay_stream(request, inbox, settings, deadline)
        else:
            reply = await _next(inbox, deadline - time.monotonic())
            if reply is None:
                raise _Timeout(f"no answer within {settings.request_timeout_s:g} s")
            response = _final(request, reply)
        finished = True
        return response
    finally:
        replies.close(job_id)
        if not finished:
            # Client gone, timed out or failed: the worker must not spend tokens for nobody.
            await asyncio.shield(broker.publish_cancel(job_id))


async def _next(inbox: asyncio.Queue[Reply], within_s: float) -> Reply | None:
    try:
        return await asyncio.wait_for(inbox.get(), max(within_s, 0))
    except asyncio.TimeoutError:
        return None


def _final(request: web.Request, reply: Reply) -> web.Response:
    if reply.provider_seconds is not None:
        request[PROVIDER_SECONDS] = reply.provider_seconds
    if reply.kind == "message":
        return json_bytes(reply.body)
    if reply.kind == "error":
        if not reply.body:
            raise Unavailable("lost the connection to the message broker; retry")
        return json_bytes(reply.body, status=reply.status or 500)
    raise Unavailable(f"unexpected reply {reply.kind!r} from the worker")


async def _relay_stream(request: web.Request, inbox: asyncio.Queue[Reply], settings: Settings,
                        deadline: float) -> web.StreamResponse:
    """Hold the status line until the first event, so a provider error before any output is
    still a proper HTTP error; then write each event as it comes."""
    reply = await _next(inbox, min(settings.stream_idle_timeout_s, deadline - time.monotonic()))
    if reply is None:
        raise _Timeout("the provider sent nothing in time")
    if reply.kind != "event":
        return _final(request, reply)

    response = web.StreamResponse(headers={
        "Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no", REQUEST_ID: request.get(REQUEST_ID_KEY, ""),
    })
    await response.prepare(request)
    last_event = time.monotonic()
    while True:
        if reply is not None:
            if reply.kind == "event":
                await response.write(_sse(reply))
                last_event = time.monotonic()
            elif reply.kind == "end":
                break
            else:  # error after the stream began: an SSE error event, then the end
                await response.write(_sse_error(reply))
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
    return response


def _sse(reply: Reply) -> bytes:
    return b"event: " + (reply.event or "message").encode() + b"\ndata: " + reply.body + b"\n\n"


def _sse_error(reply: Reply) -> bytes:
    if reply.kind == "error" and reply.body:
        return b"event: error\ndata: " + reply.body + b"\n\n"
    return _sse_error_of("api_error", "lost the connection to the worker")


def _sse_error_of(error_type: str, message: str) -> bytes:
    return b"event: error\ndata: " + ErrorEnvelope.of(error_type, message).to_json() + b"\n\n"

