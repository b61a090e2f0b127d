"""Writing a streamed answer, and the ways a misbehaving upstream breaks one.

Faults count content deltas and strike in place of delta N+1, or at the tail when the answer
has no more than N deltas: `error_after` sends an error event, `drop_after` cuts the connection
without the closing chunk, `stall_after` goes silent until the client leaves.
"""

from __future__ import annotations

import asyncio
import contextlib

from aiohttp import web

from fakeprovider.answer import Answer, Directives
from fakeprovider.protocol import Dialect
from fakeprovider.state import Call

STREAM_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
FAULTS = ("error_after", "drop_after", "stall_after")

# How often a stalled stream checks that its client is still there, when the server does not
# cancel handlers on disconnect (with handler cancellation the stall ends at once).
STALL_CHECK_SECONDS = 0.25


def _fault(directives: Directives, deltas: int, tail: bool) -> str | None:
    """The fault to strike before this frame: the first whose count is reached."""
    for name in FAULTS:
        after = getattr(directives, name)
        if after is not None and (tail or deltas == after):
            return name
    return None


async def stream_answer(
    request: web.Request,
    call: Call,
    dialect: Dialect,
    answer: Answer,
    directives: Directives,
    include_usage: bool,
    headers: dict[str, str],
    stopping: asyncio.Event,
) -> web.StreamResponse:
    response = web.StreamResponse(status=200, headers={**STREAM_HEADERS, **headers})
    call.status = 200
    try:
        await response.prepare(request)
        deltas = 0
        for number, frame in enumerate(dialect.frames(answer, directives.chunks, include_usage)):
            if number and directives.stream_delay:
                await asyncio.sleep(directives.stream_delay)
            fault = None
            if frame.kind != "event":
                fault = _fault(directives, deltas, frame.kind == "tail")
            if fault is not None:
                call.fault = fault
                if fault == "drop_after":
                    await _drop(request)
                    return response
                if fault == "stall_after":
                    await _stall(request, call, stopping)
                    return response
                await response.write(dialect.stream_error(call.request_id))
                break
            await response.write(frame.data)
            deltas += frame.kind == "delta"
        await response.write_eof()
    except ConnectionError:
        # The peer left and we learnt it from a write, not a cancellation (a runner without
        # handler_cancellation, or a race); aiohttp ignores it when finishing the response.
        call.cancelled = True
        return response
    call.finished = True
    return response


async def _drop(request: web.Request) -> None:
    """Close the connection mid-body: no closing chunk, so the client sees a broken transfer.

    A close, not an abort: an abort can send a reset, and a reset lets the client's kernel
    throw away bytes that already arrived. Closing after a flush delivers every delta sent
    before the cut, every time, which is what tests of a gateway need to count on.
    """
    transport = request.transport
    if transport is None or transport.is_closing():
        return
    await request.writer.drain()
    transport.close()


async def _stall(request: web.Request, call: Call, stopping: asyncio.Event) -> None:
    """Send nothing more and keep the connection open until the client goes away."""
    while not stopping.is_set():
        transport = request.transport
        if transport is None or transport.is_closing():
            call.cancelled = True
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), STALL_CHECK_SECONDS)
    # The server is stopping: end the connection as broken, not as a finished stream.
    if request.transport is not None:
        request.transport.abort()
