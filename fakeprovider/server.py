"""The fake provider: an HTTP server speaking Anthropic Messages and OpenAI chat completions.

Tests and local runs point Ferry at it instead of the real providers. Each answer is derived
from the request (see `answer`), and every call is recorded for `GET /_fake/calls`.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from dataclasses import dataclass, field

import orjson
from aiohttp import web

from fakeprovider.answer import (
    Answer,
    Directives,
    InvalidRequest,
    build_answer,
    new_id,
    parse_directives,
)
from fakeprovider.dialects import AnthropicDialect, Dialect, OpenAIDialect

RECORDED_HEADERS = ("x-api-key", "authorization", "anthropic-version", "anthropic-beta")
STREAM_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}


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


@dataclass
class FakeState:
    calls: list[Call] = field(default_factory=list)
    # How many times each (path, prompt text) has failed, for `fail_times` / `fail_once`.
    failures: dict[tuple[str, str], int] = field(default_factory=dict)

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
        self.calls.clear()
        self.failures.clear()


STATE = web.AppKey("fake_state", FakeState)


def _targets(directives: Directives, model: str, request: web.Request) -> bool:
    """Whether a failure directive applies to this model and this presented key."""
    if directives.fail_model is not None and model != directives.fail_model:
        return False
    if directives.fail_key is not None:
        auth = request.headers.get("authorization", "")
        key = request.headers.get("x-api-key") or auth.removeprefix("Bearer ").strip()
        return key == directives.fail_key
    return True


def create_app() -> web.Application:
    app = web.Application()
    app[STATE] = FakeState()
    anthropic, openai = AnthropicDialect(), OpenAIDialect()

    async def messages(request: web.Request) -> web.StreamResponse:
        return await _complete(request, anthropic)

    async def chat_completions(request: web.Request) -> web.StreamResponse:
        return await _complete(request, openai)

    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/_fake/calls", _list_calls)
    app.router.add_delete("/_fake/calls", _clear_calls)
    app.router.add_get("/healthz", _healthz)
    return app


async def _complete(request: web.Request, dialect: Dialect) -> web.StreamResponse:
    state = request.app[STATE]
    headers = {name: request.headers[name] for name in RECORDED_HEADERS if name in request.headers}
    call = Call(id=new_id(dialect.answer_id_prefix), path=request.path, headers=headers)
    state.calls.append(call)
    try:
        try:
            prompt = dialect.parse(await request.read())
            call.model, call.text, call.stream = prompt.model, prompt.text, prompt.stream
            directives, clean_text = parse_directives(prompt.text)
        except InvalidRequest as exc:
            return await _send(request, call, 400, dialect.error_body(400, str(exc)))
        # Decided on arrival, so concurrent retries of a prompt fail a predictable number of times.
        failure = None
        if _targets(directives, prompt.model, request):
            failure = state.failure_status(request.path, prompt.text, directives)
        if directives.delay:
            await asyncio.sleep(directives.delay)
        if failure is not None:
            retry = {"retry-after": directives.retry_after} if directives.retry_after else {}
            body = dialect.error_body(failure, f"fake provider failure {failure}")
            return await _send(request, call, failure, body, retry)
        answer = build_answer(prompt, directives, clean_text, call.id, dialect.tool_id_prefix)
        if prompt.stream:
            return await _stream(request, call, dialect, answer, directives, prompt.include_usage)
        return await _send(request, call, 200, dialect.message(answer))
    except asyncio.CancelledError:
        # handler_cancellation: the client went away (during `delay`, or while we wrote).
        call.cancelled = True
        raise


async def _send(
    request: web.Request,
    call: Call,
    status: int,
    body: bytes,
    headers: dict[str, str] | None = None,
) -> web.StreamResponse:
    """Write a JSON answer here rather than returning it, so `finished` is known to be true."""
    response = web.Response(
        status=status, body=body, content_type="application/json", headers=headers
    )
    response.headers["request-id"] = new_id("req_fake_")
    call.status = status
    try:
        await response.prepare(request)
        await response.write_eof()
    except ConnectionError:
        call.cancelled = True
        return response
    call.finished = True
    return response


async def _stream(
    request: web.Request,
    call: Call,
    dialect: Dialect,
    answer: Answer,
    directives: Directives,
    include_usage: bool,
) -> web.StreamResponse:
    response = web.StreamResponse(status=200, headers=STREAM_HEADERS)
    response.headers["request-id"] = new_id("req_fake_")
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
                await response.write(dialect.stream_error)
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


async def _list_calls(request: web.Request) -> web.Response:
    body = orjson.dumps(request.app[STATE].calls)
    return web.Response(body=body, content_type="application/json")


async def _clear_calls(request: web.Request) -> web.Response:
    request.app[STATE].clear()
    return web.Response(status=204)


async def _healthz(request: web.Request) -> web.Response:
    return web.Response(body=orjson.dumps({"ok": True}), content_type="application/json")


def run(host: str = "127.0.0.1", port: int = 8090) -> None:
    """Serve until SIGINT / SIGTERM."""
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(host, port))


async def _serve(host: str, port: int) -> None:
    runner = web.AppRunner(create_app(), handler_cancellation=True)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        bound_host, bound_port = runner.addresses[0][:2]
        print(f"fakeprovider listening on http://{bound_host}:{bound_port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()
