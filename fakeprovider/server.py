"""The fake provider: an HTTP server speaking Anthropic Messages and OpenAI chat completions.

Tests and local runs point Ferry at it instead of the real providers. Each answer is derived
from the request (see `answer`), and every call is recorded for `GET /_fake/calls`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Awaitable, Callable, Mapping

import orjson
from aiohttp import web

from fakeprovider import admin, models
from fakeprovider.answer import (
    Directives,
    InvalidRequest,
    Prompt,
    build_answer,
    new_id,
    parse_directives,
)
from fakeprovider.dialects import AnthropicDialect, Dialect, OpenAIDialect
from fakeprovider.ratelimit import Allowance, Limiter, RateLimit, presented_key
from fakeprovider.state import STATE, Call, FakeState
from fakeprovider.stream import stream_answer

# Anthropic's limit for Messages and count_tokens bodies; larger ones get its 413.
MAX_BODY = 32 * 1024 * 1024
REQUEST_ID_PREFIX = "req_fake_"

# Answers a request whose prompt and directives were read and which is not meant to fail.
Respond = Callable[
    [web.Request, Call, Prompt, Directives, str, dict[str, str]], Awaitable[web.StreamResponse]
]


def create_app(rate_limit: RateLimit | None = None, *, max_body: int = MAX_BODY) -> web.Application:
    """The fake provider; `rate_limit` None answers every request (see `run` for the
    environment, `POST /_fake/config` to change it while running)."""
    app = web.Application(client_max_size=max_body)
    app[STATE] = FakeState(limiter=Limiter(rate_limit))
    anthropic, openai = AnthropicDialect(), OpenAIDialect()

    async def messages(request: web.Request) -> web.StreamResponse:
        return await _serve(request, anthropic, anthropic.parse, _answer(anthropic))

    async def chat_completions(request: web.Request) -> web.StreamResponse:
        return await _serve(request, openai, openai.parse, _answer(openai))

    async def count_tokens(request: web.Request) -> web.StreamResponse:
        # Failure directives (`status`, `fail_*`, `delay`) act here too; the answer-shaping
        # ones have nothing to shape, so they are read but not refused.
        return await _serve(request, anthropic, anthropic.parse_count, _count, answers=False)

    async def list_or_get_model(request: web.Request) -> web.StreamResponse:
        return await _models(request, anthropic)

    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/v1/messages/count_tokens", count_tokens)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", list_or_get_model)
    app.router.add_get("/v1/models/{model_id}", list_or_get_model)
    admin.add_routes(app)
    app.on_shutdown.append(_release_stalled)
    return app


async def _release_stalled(app: web.Application) -> None:
    app[STATE].stopping.set()


def _targets(directives: Directives, model: str, request: web.Request) -> bool:
    """Whether a failure directive applies to this model and this presented key."""
    if directives.fail_model is not None and model != directives.fail_model:
        return False
    if directives.fail_key is not None:
        return presented_key(request.headers) == directives.fail_key
    return True


async def _record(request: web.Request, call_id: str, request_id: str) -> tuple[Call, bytes | None]:
    """Record the call as it arrived; the body is None when it is over the size limit."""
    body: bytes | None
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        body = None
    call = Call.arrived(request, call_id, request_id, body or b"")
    request.app[STATE].calls.append(call)
    return call, body


def _limited(allowance: Allowance) -> str:
    return (
        f"fake provider rate limit: {allowance.rate:g} requests per second for this API key "
        f"(bucket of {allowance.limit}); retry after {allowance.retry_after}s"
    )


async def _serve(
    request: web.Request,
    dialect: Dialect,
    parse: Callable[[bytes], Prompt],
    respond: Respond,
    answers: bool = True,
) -> web.StreamResponse:
    """Record, rate-limit, validate, then fail or answer as the directives say."""
    state = request.app[STATE]
    request_id = new_id(REQUEST_ID_PREFIX)
    call_id = new_id(dialect.answer_id_prefix) if answers else request_id
    call, body = await _record(request, call_id, request_id)
    try:
        if body is None:
            error = dialect.error_body(413, "request body too large", request_id)
            return await _send(request, call, 413, error, dialect.headers(request_id, None))
        allowance = state.limiter.take(presented_key(request.headers))
        headers = dialect.headers(request_id, allowance)
        if allowance is not None and not allowance.allowed:
            error = dialect.error_body(429, _limited(allowance), request_id)
            return await _send(request, call, 429, error, headers)
        try:
            prompt = parse(body)
            call.model, call.text, call.stream = prompt.model, prompt.text, prompt.stream
            directives, clean_text = parse_directives(prompt.text)
            if answers:
                directives.check_mode(prompt.stream)
        except InvalidRequest as exc:
            return await _send(
                request, call, 400, dialect.error_body(400, str(exc), request_id), headers
            )
        # Decided on arrival, so concurrent retries of a prompt fail a predictable number of times.
        failure = None
        if _targets(directives, prompt.model, request):
            failure = state.failure_status(request.path, prompt.text, directives)
        if directives.delay:
            await asyncio.sleep(directives.delay)
        if failure is not None:
            if directives.retry_after:
                headers["retry-after"] = directives.retry_after
            error = dialect.error_body(failure, f"fake provider failure {failure}", request_id)
            return await _send(request, call, failure, error, headers)
        return await respond(request, call, prompt, directives, clean_text, headers)
    except asyncio.CancelledError:
        # handler_cancellation: the client went away (during `delay`, or while we wrote).
        call.cancelled = True
        raise


def _answer(dialect: Dialect) -> Respond:
    async def respond(
        request: web.Request,
        call: Call,
        prompt: Prompt,
        directives: Directives,
        clean_text: str,
        headers: dict[str, str],
    ) -> web.StreamResponse:
        answer = build_answer(prompt, directives, clean_text, call.id, dialect.tool_id_prefix)
        if prompt.stream:
            stopping = request.app[STATE].stopping
            return await stream_answer(
                request, call, dialect, answer, directives, prompt.include_usage, headers, stopping
            )
        body = dialect.message(answer)
        if directives.bad_json:
            # A proper prefix of a JSON object is never valid JSON: a body cut in transit.
            call.fault = "bad_json"
            body = body[: len(body) // 2]
        return await _send(request, call, 200, body, headers)

    return respond


async def _count(
    request: web.Request,
    call: Call,
    prompt: Prompt,
    directives: Directives,
    clean_text: str,
    headers: dict[str, str],
) -> web.StreamResponse:
    body = orjson.dumps({"input_tokens": max(1, prompt.input_words)})
    return await _send(request, call, 200, body, headers)


async def _models(request: web.Request, dialect: AnthropicDialect) -> web.StreamResponse:
    """`GET /v1/models[/{id}]`: recorded, never rate-limited (the headers show the bucket)."""
    request_id = new_id(REQUEST_ID_PREFIX)
    call, _ = await _record(request, request_id, request_id)
    headers = dialect.headers(
        request_id, request.app[STATE].limiter.peek(presented_key(request.headers))
    )
    model_id = request.match_info.get("model_id")
    call.model = model_id
    try:
        if model_id is None:
            payload = models.page(request.query)
        else:
            model = models.find(model_id)
            if model is None:
                error = dialect.error_body(404, f"model: {model_id}", request_id)
                return await _send(request, call, 404, error, headers)
            payload = model.to_json()
    except InvalidRequest as exc:
        return await _send(
            request, call, 400, dialect.error_body(400, str(exc), request_id), headers
        )
    return await _send(request, call, 200, orjson.dumps(payload), headers)


async def _send(
    request: web.Request,
    call: Call,
    status: int,
    body: bytes,
    headers: dict[str, str],
) -> web.StreamResponse:
    """Write a JSON answer here rather than returning it, so `finished` is known to be true."""
    response = web.Response(
        status=status, body=body, content_type="application/json", headers=headers
    )
    call.status = status
    try:
        await response.prepare(request)
        await response.write_eof()
    except ConnectionError:
        call.cancelled = True
        return response
    call.finished = True
    return response


def run(host: str = "127.0.0.1", port: int = 8090, env: Mapping[str, str] | None = None) -> None:
    """Serve until SIGINT / SIGTERM; the rate limit comes from FAKE_PROVIDER_RPS,
    FAKE_PROVIDER_BURST and FAKE_PROVIDER_KEY_LIMITS (a malformed value stops the start)."""
    rate_limit = RateLimit.from_env(os.environ if env is None else env)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_forever(host, port, rate_limit))


async def _serve_forever(host: str, port: int, rate_limit: RateLimit | None) -> None:
    runner = web.AppRunner(create_app(rate_limit), handler_cancellation=True)
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
