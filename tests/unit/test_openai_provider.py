"""The OpenAI adapter against the fake provider (a real aiohttp server on a free port)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
import pytest_asyncio
from aiohttp import ClientSession, web
from anthropic.lib.streaming._messages import accumulate_event

from fakeprovider.server import create_app
from worker.providers.base import CallContext, ProviderError, SSEEvent
from worker.providers.openai import OpenAIProvider
from worker.providers.openai_translate import TranslationError

Json = dict[str, Any]
CTX = CallContext(forward_headers=(("anthropic-version", "2023-06-01"),))
TOOLS = [{"name": n, "input_schema": {"type": "object"}} for n in ("get", "run")]


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


@pytest_asyncio.fixture(scope="module")
async def fake() -> AsyncIterator[str]:
    runner, url = await serve(create_app())
    yield url
    await runner.cleanup()


@pytest_asyncio.fixture(scope="module")
async def http() -> AsyncIterator[ClientSession]:
    async with ClientSession() as session:
        yield session


@pytest.fixture
def provider(http: ClientSession, fake: str) -> OpenAIProvider:
    return OpenAIProvider(http, "openai", f"{fake}/v1/", "sk-test", timeout_s=5)


@pytest_asyncio.fixture(autouse=True)
async def clean(http: ClientSession, fake: str) -> None:
    async with http.delete(f"{fake}/_fake/calls") as resp:
        assert resp.status == 204


async def fake_calls(http: ClientSession, fake: str) -> list[Json]:
    async with http.get(f"{fake}/_fake/calls") as resp:
        result: list[Json] = await resp.json()
        return result


def body(prompt: str | list[Json], max_tokens: int = 100, **fields: Any) -> bytes:
    messages = [{"role": "user", "content": prompt}]
    return orjson.dumps({"model": "gpt-up", "max_tokens": max_tokens, "messages": messages,
                         **fields})


async def collect(events: AsyncIterator[SSEEvent]) -> list[tuple[str, Json]]:
    out = []
    async for event in events:
        data = orjson.loads(event.data)
        assert data["type"] == event.event
        out.append((event.event, data))
    return out


def rebuild(events: list[tuple[str, Json]]) -> tuple[str, list[Json]]:
    """The text and tool_use blocks a client would assemble from the events."""
    blocks: dict[int, Json] = {}
    pieces: dict[int, list[str]] = {}
    for name, data in events:
        if name == "content_block_start":
            blocks[data["index"]] = dict(data["content_block"])
        elif name == "content_block_delta":
            delta = data["delta"]
            piece = delta["text"] if delta["type"] == "text_delta" else delta["partial_json"]
            pieces.setdefault(data["index"], []).append(piece)
    text, tools = "", []
    for index in sorted(blocks):
        joined = "".join(pieces.get(index, []))
        if blocks[index]["type"] == "text":
            text += joined
        else:
            tools.append({**blocks[index], "input": orjson.loads(joined or "{}")})
    return text, tools


async def test_text_answer(provider: OpenAIProvider, http: ClientSession, fake: str) -> None:
    response = await provider.create_message(body("hello there", system="be kind"), CTX)
    message = orjson.loads(response.body)
    assert message["id"].startswith("msg_chatcmpl-fake-")
    assert (message["type"], message["role"]) == ("message", "assistant")
    assert message["model"] == "gpt-up"
    assert message["content"] == [{"type": "text", "text": "echo: hello there"}]
    assert (message["stop_reason"], message["stop_sequence"]) == ("end_turn", None)
    usage = {"input_tokens": 4, "output_tokens": 3,
             "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
    assert message["usage"] == usage
    assert (response.stop_reason, response.usage) == ("end_turn", usage)
    [call] = await fake_calls(http, fake)
    assert call["path"] == "/v1/chat/completions" and call["model"] == "gpt-up"
    assert call["headers"] == {"authorization": "Bearer sk-test"}
    assert call["stream"] is False


@pytest.mark.parametrize(("own_key", "ctx_key", "sent"), [
    (None, "sk-pool", {"authorization": "Bearer sk-pool"}),
    ("sk-own", "sk-pool", {"authorization": "Bearer sk-pool"}),
    ("sk-own", None, {"authorization": "Bearer sk-own"}),
    (None, None, {}),
])
async def test_api_key(http: ClientSession, fake: str, own_key: str | None,
                       ctx_key: str | None, sent: dict[str, str]) -> None:
    provider = OpenAIProvider(http, "openai", f"{fake}/v1", own_key, timeout_s=5)
    await provider.create_message(body("x"), CallContext(api_key=ctx_key))
    [call] = await fake_calls(http, fake)
    assert call["headers"] == sent


async def test_tool_answer(provider: OpenAIProvider) -> None:
    prompt = [{"type": "text", "text": "find it [[fake:tool=get,tools=2]]"}]
    response = await provider.create_message(body(prompt, tools=TOOLS), CTX)
    message = orjson.loads(response.body)
    assert response.stop_reason == "tool_use"
    text, *calls = message["content"]
    assert text == {"type": "text", "text": "echo: find it"}
    assert [(c["type"], c["name"], c["input"]) for c in calls] == [
        ("tool_use", "get", {"query": "find it", "n": 1}),
        ("tool_use", "get", {"query": "find it", "n": 2}),
    ]
    assert all(c["id"].startswith("call_fake_") for c in calls)


async def test_max_tokens(provider: OpenAIProvider) -> None:
    response = await provider.create_message(body("one two three", max_tokens=2), CTX)
    assert orjson.loads(response.body)["content"] == [{"type": "text", "text": "echo: one"}]
    assert response.stop_reason == "max_tokens"


@pytest.mark.parametrize("prompt", ["a b c d e", "go far [[fake:tool=run,tools=2]]",
                                    "x [[fake:chunks=2,blocks=3]]"])
async def test_stream_matches_answer(provider: OpenAIProvider, prompt: str) -> None:
    answer = orjson.loads((await provider.create_message(body(prompt, tools=TOOLS), CTX)).body)
    events = await collect(provider.stream_message(body(prompt, tools=TOOLS), CTX))
    names = [name for name, _ in events]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    assert names.count("content_block_start") == names.count("content_block_stop")
    text, tools = rebuild(events)
    assert text == "".join(b["text"] for b in answer["content"] if b["type"] == "text")
    assert [(t["name"], t["input"]) for t in tools] == [
        (b["name"], b["input"]) for b in answer["content"] if b["type"] == "tool_use"]
    final = events[-2][1]
    assert final["delta"] == {"stop_reason": answer["stop_reason"], "stop_sequence": None}
    assert final["usage"] == {k: answer["usage"][k] for k in ("input_tokens", "output_tokens")}
    # The official SDK's stream accumulator must rebuild the very Message the JSON call gave.
    snapshot = None
    json_bufs: dict[int, bytes] = {}
    for _, data in events:
        snapshot = accumulate_event(event=data, current_snapshot=snapshot,  # type: ignore[arg-type]
                                    json_bufs=json_bufs)
    assert snapshot is not None
    streamed: Json = snapshot.to_dict(exclude_none=True)
    assert streamed["id"].startswith("msg_chatcmpl-fake-")
    for message in (streamed, answer):  # each call gets fresh ids from the fake
        message["id"] = "ID"
        for block in message["content"]:
            if block["type"] == "tool_use":
                assert block.pop("id").startswith("call_fake_")
    assert {key: streamed.get(key) for key in answer} == answer


async def test_stream_is_incremental(provider: OpenAIProvider, http: ClientSession,
                                     fake: str) -> None:
    stream = provider.stream_message(body("a b c d e f [[fake:stream_delay=0.05]]"), CTX)
    first = await anext(stream)
    assert first.event == "message_start"
    [call] = await fake_calls(http, fake)
    assert (call["stream"], call["finished"]) == (True, False)  # still sending
    rest = await collect(stream)
    assert rest[-1][0] == "message_stop"


@pytest.mark.parametrize("stream", [False, True])
async def test_rate_limited(provider: OpenAIProvider, stream: bool) -> None:
    request = body("x [[fake:status=429,retry_after=3]]")
    with pytest.raises(ProviderError) as caught:
        if stream:
            await anext(provider.stream_message(request, CTX))
        else:
            await provider.create_message(request, CTX)
    error = caught.value
    assert (error.status, error.error_type, error.message) == (
        429, "rate_limit_error", "fake provider failure 429")
    assert (error.retryable, error.retry_after) == (True, 3.0)


@pytest.mark.parametrize("stream", [False, True])
async def test_bad_request_not_retryable(provider: OpenAIProvider, stream: bool) -> None:
    request = body("x [[fake:status=400]]")
    with pytest.raises(ProviderError) as caught:
        if stream:
            await anext(provider.stream_message(request, CTX))
        else:
            await provider.create_message(request, CTX)
    error = caught.value
    assert (error.status, error.error_type) == (400, "invalid_request_error")
    assert error.retryable is False


async def test_stream_error_midway(provider: OpenAIProvider) -> None:
    events = await collect(provider.stream_message(body("a b c [[fake:error_after=1]]"), CTX))
    assert [name for name, _ in events] == [
        "message_start", "content_block_start", "content_block_delta", "error"]
    assert events[-1][1]["error"] == {"type": "api_error",
                                      "message": "fake provider failure mid-stream"}


async def test_untranslatable_request_is_not_sent(
    provider: OpenAIProvider, http: ClientSession, fake: str
) -> None:
    doc = {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "d"}}
    with pytest.raises(TranslationError):
        await provider.create_message(body([doc]), CTX)
    with pytest.raises(TranslationError):
        await anext(provider.stream_message(body([doc]), CTX))
    with pytest.raises(ProviderError) as caught:
        await provider.create_message(b'{"model": "m"}', CTX)
    assert (caught.value.status, caught.value.retryable) == (400, False)
    assert await fake_calls(http, fake) == []


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.mark.parametrize("stream", [False, True])
async def test_unreachable(http: ClientSession, stream: bool) -> None:
    provider = OpenAIProvider(http, "local", f"http://127.0.0.1:{closed_port()}/v1", None, 5)
    with pytest.raises(ProviderError) as caught:
        if stream:
            await anext(provider.stream_message(body("x"), CTX))
        else:
            await provider.create_message(body("x"), CTX)
    assert (caught.value.status, caught.value.error_type, caught.value.retryable) == (
        502, "api_error", True)


# --- a scripted upstream, for streams the fake provider does not produce ----------------------


async def scripted(parts: list[bytes | float]) -> tuple[web.AppRunner, str]:
    """An upstream that writes `parts` (bytes, or a pause in seconds) and closes the body."""

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for part in parts:
            if isinstance(part, float):
                await asyncio.sleep(part)
            else:
                await response.write(part)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    return await serve(app)


def data(payload: Json) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\r\n\r\n"


TEXT = data({"id": "c1", "choices": [{"index": 0, "delta": {"content": "hi"}}]})
FINISH = data({"id": "c1", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})


@pytest.mark.parametrize(("parts", "last"), [
    ([b": ping\n\n", TEXT[:9], TEXT[9:], FINISH], ("message_stop", None)),
    ([TEXT], ("error", "api_error: the provider's stream ended before it finished")),
    ([TEXT, b"data: {not json\n\n"], ("error", "api_error: the provider sent invalid stream data")),
    ([TEXT, 1.0, FINISH], ("error", "timeout_error: provider `scripted` stopped sending")),
    ([TEXT, FINISH, b"data: [DONE]\n\n", TEXT], ("message_stop", None)),
])
async def test_stream_endings(http: ClientSession, parts: list[bytes | float],
                              last: tuple[str, str | None]) -> None:
    runner, url = await scripted(parts)
    try:
        provider = OpenAIProvider(http, "scripted", f"{url}/v1", None, timeout_s=0.3)
        events = await collect(provider.stream_message(body("x"), CTX))
    finally:
        await runner.cleanup()
    assert [name for name, _ in events[:3]] == [
        "message_start", "content_block_start", "content_block_delta"]
    assert events[2][1]["delta"] == {"type": "text_delta", "text": "hi"}
    name, message = last
    assert events[-1][0] == name
    if message is not None:
        error_type, _, text = message.partition(": ")
        assert events[-1][1]["error"] == {"type": error_type, "message": text}
    else:
        assert [n for n, _ in events].count("content_block_delta") == 1


RATE_LIMITED = data({"error": {"message": "slow down", "type": "requests",
                               "code": "rate_limit_exceeded"}})


@pytest.mark.parametrize(("parts", "expected"), [
    ([RATE_LIMITED], (429, "rate_limit_error", "slow down")),
    ([], (502, "api_error", "the provider's stream ended before it finished")),
    ([1.0, TEXT], (504, "timeout_error", "provider `scripted` stopped sending")),
])
async def test_stream_fails_before_first_event(
    http: ClientSession, parts: list[bytes | float], expected: tuple[int, str, str]
) -> None:
    """With nothing sent to the client yet, a failure is raised, so the call can be retried."""
    runner, url = await scripted(parts)
    try:
        provider = OpenAIProvider(http, "scripted", f"{url}/v1", None, timeout_s=0.3)
        with pytest.raises(ProviderError) as caught:
            await anext(provider.stream_message(body("x"), CTX))
    finally:
        await runner.cleanup()
    error = caught.value
    assert (error.status, error.error_type, error.message) == expected
    assert error.retryable is True


@pytest.mark.parametrize("number", [b"1e400", b"-1e999", b"9" * 400])
async def test_a_number_beyond_64_bits_is_refused_not_changed(http: ClientSession,
                                                              number: bytes) -> None:
    provider = OpenAIProvider(http, "openai", "http://127.0.0.1:9/v1", None, timeout_s=1)
    raw = (b'{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"x"}],'
           b'"tools":[{"name":"t","input_schema":{"type":"object","maximum":' + number + b"}}]}")
    with pytest.raises(ProviderError) as raised:
        await provider.create_message(raw, CTX)
    assert (raised.value.status, raised.value.error_type) == (400, "invalid_request_error")
    assert "number" in raised.value.message or "64-bit" in raised.value.message
