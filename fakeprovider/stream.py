"""Writing a streamed answer, and `error_after`: an error event in place of the rest of it."""

from __future__ import annotations

import asyncio

from aiohttp import web

from fakeprovider.answer import Answer, Directives
from fakeprovider.protocol import Dialect
from fakeprovider.state import Call

STREAM_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}


async def stream_answer(
    request: web.Request,
    call: Call,
    dialect: Dialect,
    answer: Answer,
    directives: Directives,
    include_usage: bool,
    headers: dict[str, str],
) -> web.StreamResponse:
    response = web.StreamResponse(status=200, headers={**STREAM_HEADERS, **headers})
    call.status = 200
    try:
        await response.prepare(request)
        deltas = 0
        for number, frame in enumerate(dialect.frames(answer, directives.chunks, include_usage)):
            if number and directives.stream_delay:
                await asyncio.sleep(directives.stream_delay)
            if directives.error_after is not None and (
                frame.kind == "tail" or (frame.kind == "delta" and deltas == directives.error_after)
            ):
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
