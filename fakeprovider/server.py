"""The fake provider: an HTTP server speaking Anthropic Messages and OpenAI chat completions.

Tests and local runs point Ferry at it instead of the real providers. Each answer is derived
from the request (see `answer`), and every call is recorded for `GET /_fake/calls`.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal

from aiohttp import web

from fakeprovider import admin
from fakeprovider.answer import (
    Directives,
    InvalidRequest,
    build_answer,
    new_id,
    parse_directives,
)
from fakeprovider.dialects import AnthropicDialect, Dialect, OpenAIDialect
from fakeprovider.state import RECORDED_HEADERS, STATE, Call, FakeState
from fakeprovider.stream import stream_answer


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
    admin.add_routes(app)
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
            return await stream_answer(
                request, call, dialect, answer, directives, prompt.include_usage
            )
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
