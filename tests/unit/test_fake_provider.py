"""The fake provider, served on a real port and driven by the official anthropic SDK and aiohttp."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anthropic
import orjson
import pytest
import pytest_asyncio
from aiohttp import ClientSession, web
from anthropic.types import MessageParam

from fakeprovider.answer import (
    InvalidRequest,
    first_words,
    parse_directives,
    split_json,
    split_text,
)
from fakeprovider.server import create_app

Json = dict[str, Any]


@pytest_asyncio.fixture(scope="module")
async def client(base_url: str) -> AsyncIterator[anthropic.AsyncAnthropic]:
    sdk = anthropic.AsyncAnthropic(base_url=base_url, api_key="k", max_retries=0)
    yield sdk
    await sdk.close()


@pytest_asyncio.fixture(autouse=True)
async def clean(base_url: str, http: ClientSession) -> None:
    async with http.delete(f"{base_url}/_fake/calls") as resp:
        assert resp.status == 204


async def calls(http: ClientSession, base_url: str) -> list[Json]:
    async with http.get(f"{base_url}/_fake/calls") as resp:
        result: list[Json] = await resp.json()
        return result


async def wait_for_call(http: ClientSession, base_url: str, check: Callable[[Json], bool]) -> Json:
    """The handler records a disconnect when aiohttp cancels it, shortly after the client left."""
    deadline = time.monotonic() + 2
    while True:
        found = [c for c in await calls(http, base_url) if check(c)]
        if found or time.monotonic() > deadline:
            assert found, await calls(http, base_url)
            return found[0]
        await asyncio.sleep(0.02)


def user(text: str) -> list[MessageParam]:
    return [{"role": "user", "content": text}]


def sse_frames(body: bytes) -> list[tuple[str, Json]]:
    assert body.endswith(b"\n\n")
    frames = []
    for raw in body[:-2].split(b"\n\n"):
        event_line, data_line = raw.split(b"\n")
        assert event_line.startswith(b"event: ") and data_line.startswith(b"data: ")
        payload = orjson.loads(data_line[len(b"data: ") :])
        assert payload["type"] == event_line[len(b"event: ") :].decode()
        frames.append((payload["type"], payload))
    return frames


def openai_lines(body: bytes) -> list[Any]:
    assert body.endswith(b"\n\n")
    lines = []
    for raw in body[:-2].split(b"\n\n"):
        assert raw.startswith(b"data: ")
        data = raw[len(b"data: ") :]
        lines.append("[DONE]" if data == b"[DONE]" else orjson.loads(data))
    return lines


# --- pure helpers -----------------------------------------------------------------------------


def test_directives_are_read_and_removed() -> None:
    directives, clean = parse_directives(
        "  look [[fake:tool=find,tools=2]] it up [[fake:fail_once=503]] "
    )
    assert clean == "look it up"
    assert (directives.tool, directives.tools) == ("find", 2)
    assert (directives.fail_times, directives.status, directives.failure_status) == (1, 503, 503)
    assert parse_directives("[[fake:fail_times=2]]")[0].failure_status == 500


@pytest.mark.parametrize(
    "text",
    [
        "[[fake:nope=1]]",
        "[[fake:delay=soon]]",
        "[[fake:status=200]]",
        "[[fake:chunks=0]]",
        "[[fake:tool]]",
    ],
)
def test_bad_directives_are_refused(text: str) -> None:
    with pytest.raises(InvalidRequest):
        parse_directives(text)


def test_splitting_keeps_text_exact() -> None:
    text = "echo:  two  spaces\nand a newline"
    assert "".join(split_text(text, None)) == text
    assert split_text("echo: a b", None) == ["echo: ", "a ", "b"]
    assert len(split_text(text, 4)) == 4 and "".join(split_text(text, 4)) == text
    assert split_text("ab", 5) == ["a", "b"]
    assert len(split_json('{"n":1}', None)) == 3
    assert first_words("echo: a  b c", 3) == "echo: a  b"


# --- Anthropic route, through the SDK ---------------------------------------------------------


async def test_create_echoes_text_and_counts_words(
    client: anthropic.AsyncAnthropic, http: ClientSession, base_url: str
) -> None:
    message = await client.messages.create(
        model="claude-fake",
        max_tokens=100,
        system="be brief",
        messages=[
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "an answer"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "hello brave "},
                    {"type": "text", "text": "new world [[fake:delay=0.01]]"},
                ],
            },
        ],
    )
    assert message.id.startswith("msg_fake_")
    assert message.model == "claude-fake"
    assert [b.type for b in message.content] == ["text"]
    assert message.content[0].text == "echo: hello brave new world"  # type: ignore[union-attr]
    assert message.stop_reason == "end_turn"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (11, 5)
    [call] = await calls(http, base_url)
    assert call["id"] == message.id
    assert call["path"] == "/v1/messages" and call["model"] == "claude-fake"
    assert call["text"] == "hello brave new world [[fake:delay=0.01]]"
    # SDK 2.x sends the key as `Authorization: Bearer`, older ones as `x-api-key`.
    headers = call["headers"]
    assert headers.get("x-api-key") == "k" or headers.get("authorization") == "Bearer k"
    assert headers["anthropic-version"] == client.default_headers["anthropic-version"]
    assert (call["stream"], call["status"], call["finished"], call["cancelled"]) == (
        False,
        200,
        True,
        False,
    )


async def test_stream_rebuilds_the_non_streamed_message(client: anthropic.AsyncAnthropic) -> None:
    request: Json = {
        "model": "m",
        "max_tokens": 100,
        "messages": user("stream me  please [[fake:blocks=2]]"),
    }
    plain = await client.messages.create(**request)
    async with client.messages.stream(**request) as stream:
        texts = [t async for t in stream.text_stream]
        final = await stream.get_final_message()
    assert len(texts) > 4
    assert "".join(texts) == "echo: stream me  please [0]echo: stream me  please [1]"
    assert [b.model_dump() for b in final.content] == [b.model_dump() for b in plain.content]
    assert (final.stop_reason, final.usage.input_tokens, final.usage.output_tokens) == (
        plain.stop_reason,
        plain.usage.input_tokens,
        plain.usage.output_tokens,
    )


async def test_tool_directive_gives_tool_use_blocks(client: anthropic.AsyncAnthropic) -> None:
    message = await client.messages.create(
        model="m", max_tokens=100, messages=user("find cats [[fake:tool=search,tools=2]]")
    )
    text, first, second = message.content
    assert text.type == "text" and text.text == "echo: find cats"
    assert first.type == "tool_use" and second.type == "tool_use"
    assert first.id.startswith("toolu_fake_") and first.id != second.id
    assert (first.name, first.input, second.input) == (
        "search",
        {"query": "find cats", "n": 1},
        {"query": "find cats", "n": 2},
    )
    assert message.stop_reason == "tool_use"
    assert message.usage.output_tokens == 3 + 2 * 10


async def test_streamed_tool_input_is_accumulated_by_the_sdk(
    client: anthropic.AsyncAnthropic,
) -> None:
    async with client.messages.stream(
        model="m", max_tokens=100, messages=user('quote "this" [[fake:tool=lookup]]')
    ) as stream:
        pieces = [
            e.delta.partial_json
            async for e in stream
            if e.type == "content_block_delta" and e.delta.type == "input_json_delta"
        ]
        final = await stream.get_final_message()
    assert len(pieces) >= 3
    assert orjson.loads("".join(pieces)) == {"query": 'quote "this"', "n": 1}
    tool = final.content[1]
    assert tool.type == "tool_use" and tool.input == {"query": 'quote "this"', "n": 1}
    assert final.stop_reason == "tool_use"


async def test_max_tokens_truncates(client: anthropic.AsyncAnthropic) -> None:
    message = await client.messages.create(
        model="m", max_tokens=3, messages=user("one two three four [[fake:tool=t]]")
    )
    assert [b.type for b in message.content] == ["text"]
    assert message.content[0].text == "echo: one two"  # type: ignore[union-attr]
    assert (message.stop_reason, message.usage.output_tokens) == ("max_tokens", 3)


async def test_status_directive_raises_the_sdk_error(
    client: anthropic.AsyncAnthropic, http: ClientSession, base_url: str
) -> None:
    with pytest.raises(anthropic.InternalServerError) as overloaded:
        await client.messages.create(
            model="m", max_tokens=10, messages=user("x [[fake:status=529]]")
        )
    assert overloaded.value.status_code == 529
    request_id = overloaded.value.response.headers["request-id"]
    assert request_id.startswith("req_fake_")
    assert overloaded.value.body == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "fake provider failure 529"},
        "request_id": request_id,
    }
    with pytest.raises(anthropic.RateLimitError) as limited:
        await client.messages.create(
            model="m", max_tokens=10, messages=user("x [[fake:status=429,retry_after=7]]")
        )
    assert limited.value.response.headers["retry-after"] == "7"
    assert [c["status"] for c in await calls(http, base_url)] == [529, 429]


async def test_fail_once_fails_then_succeeds(client: anthropic.AsyncAnthropic) -> None:
    request: Json = {
        "model": "m",
        "max_tokens": 10,
        "messages": user("flaky [[fake:fail_once=500]]"),
    }
    with pytest.raises(anthropic.InternalServerError):
        await client.messages.create(**request)
    message = await client.messages.create(**request)
    assert message.content[0].text == "echo: flaky"  # type: ignore[union-attr]


async def test_sdk_retry_honours_retry_after(
    client: anthropic.AsyncAnthropic, http: ClientSession, base_url: str
) -> None:
    message = await client.with_options(max_retries=2).messages.create(
        model="m",
        max_tokens=10,
        messages=user("retry [[fake:fail_times=2,status=503,retry_after=0.01]]"),
    )
    assert message.content[0].text == "echo: retry"  # type: ignore[union-attr]
    assert [c["status"] for c in await calls(http, base_url)] == [503, 503, 200]


async def test_clearing_calls_forgets_failures(
    client: anthropic.AsyncAnthropic, http: ClientSession, base_url: str
) -> None:
    request: Json = {
        "model": "m",
        "max_tokens": 10,
        "messages": user("again [[fake:fail_once=500]]"),
    }
    with pytest.raises(anthropic.InternalServerError):
        await client.messages.create(**request)
    async with http.delete(f"{base_url}/_fake/calls"):
        pass
    assert await calls(http, base_url) == []
    with pytest.raises(anthropic.InternalServerError):
        await client.messages.create(**request)


async def test_error_after_breaks_the_sdk_stream(client: anthropic.AsyncAnthropic) -> None:
    texts: list[str] = []
    with pytest.raises(anthropic.APIStatusError) as raised:
        async with client.messages.stream(
            model="m", max_tokens=100, messages=user("a b c d e [[fake:error_after=2]]")
        ) as stream:
            async for text in stream.text_stream:
                texts.append(text)
    assert texts == ["echo: ", "a "]
    request_id = stream.response.headers["request-id"]
    assert raised.value.body == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "fake provider failure mid-stream"},
        "request_id": request_id,
    }


# --- Anthropic route, raw bytes ---------------------------------------------------------------


async def test_sse_bytes_follow_anthropic_sequence(http: ClientSession, base_url: str) -> None:
    body = {
        "model": "m",
        "max_tokens": 100,
        "stream": True,
        "messages": user("hi there [[fake:chunks=3,tool=t]]"),
    }
    async with http.post(f"{base_url}/v1/messages", json=body) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/event-stream"
        frames = sse_frames(await resp.read())
    names = [name for name, _ in frames]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[3:7] == ["content_block_delta"] * 3 + ["content_block_stop"]
    assert names[7] == "content_block_start" and frames[7][1]["content_block"]["input"] == {}
    assert names[-2:] == ["message_delta", "message_stop"]
    assert names.count("ping") == 1
    assert frames[0][1]["message"]["usage"]["input_tokens"] == 3  # directives are words too
    assert frames[-2][1]["delta"]["stop_reason"] == "tool_use"
    # Cumulative, as Anthropic sends it: input and cache counts repeated with the output.
    assert frames[-2][1]["usage"] == {
        "input_tokens": 3,
        "output_tokens": 13,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }


async def test_bad_requests_get_the_anthropic_envelope(http: ClientSession, base_url: str) -> None:
    for body in (
        {"max_tokens": 5, "messages": user("x")},
        {"model": "m", "messages": []},
        {"model": "m", "messages": user("[[fake:wat]]")},
    ):
        async with http.post(f"{base_url}/v1/messages", json=body) as resp:
            assert resp.status == 400
            error = await resp.json()
        assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    async with http.post(f"{base_url}/v1/messages", data=b"{nope") as resp:
        assert resp.status == 400


async def test_only_auth_and_version_headers_are_recorded(
    http: ClientSession, base_url: str
) -> None:
    sent = {
        "x-api-key": "secret",
        "anthropic-beta": "b1,b2",
        "anthropic-version": "2023-06-01",
        "x-other": "no",
    }
    body = {"model": "m", "max_tokens": 5, "messages": user("x")}
    async with http.post(f"{base_url}/v1/messages", json=body, headers=sent) as resp:
        assert resp.status == 200
    [call] = await calls(http, base_url)
    assert call["headers"] == {k: v for k, v in sent.items() if k != "x-other"}


async def test_healthz(http: ClientSession, base_url: str) -> None:
    async with http.get(f"{base_url}/healthz") as resp:
        assert (resp.status, await resp.json()) == (200, {"ok": True})


# --- disconnects --------------------------------------------------------------------------------


async def test_disconnect_during_delay_is_recorded(
    client: anthropic.AsyncAnthropic, http: ClientSession, base_url: str
) -> None:
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(
            client.messages.create(
                model="m", max_tokens=10, messages=user("slow [[fake:delay=5]]")
            ),
            timeout=0.3,
        )
    call = await wait_for_call(http, base_url, lambda c: c["cancelled"])
    assert (call["status"], call["finished"]) == (None, False)


async def test_disconnect_mid_stream_is_recorded(
    client: anthropic.AsyncAnthropic, http: ClientSession, base_url: str
) -> None:
    async with client.messages.stream(
        model="m", max_tokens=100, messages=user("a b c d e f [[fake:stream_delay=0.05]]")
    ) as stream:
        async for _ in stream.text_stream:
            break
    call = await wait_for_call(http, base_url, lambda c: c["cancelled"])
    assert (call["stream"], call["status"], call["finished"]) == (True, 200, False)


async def test_disconnect_seen_as_write_error_is_recorded(http: ClientSession) -> None:
    """Without handler cancellation the handler only learns of the disconnect when it writes."""
    runner = web.AppRunner(create_app())
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        body = {
            "model": "m",
            "stream": True,
            "messages": user("a b c d e f [[fake:stream_delay=0.05]]"),
        }
        async with http.post(f"{url}/v1/chat/completions", json=body) as resp:
            await resp.content.readline()
        call = await wait_for_call(http, url, lambda c: c["cancelled"])
        assert (call["status"], call["finished"]) == (200, False)
    finally:
        await runner.cleanup()


# --- OpenAI route -------------------------------------------------------------------------------


async def test_openai_completion(http: ClientSession, base_url: str) -> None:
    body = {
        "model": "gpt-fake",
        "max_tokens": 50,
        "messages": [
            {"role": "system", "content": "sys"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "find it"},
                    {"type": "text", "text": " [[fake:tool=get]]"},
                ],
            },
        ],
    }
    async with http.post(f"{base_url}/v1/chat/completions", json=body) as resp:
        assert resp.status == 200
        data = await resp.json()
    assert data["id"].startswith("chatcmpl-fake-")
    assert (data["object"], data["model"]) == ("chat.completion", "gpt-fake")
    [choice] = data["choices"]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "echo: find it"
    [tool_call] = choice["message"]["tool_calls"]
    assert tool_call["id"].startswith("call_fake_") and tool_call["type"] == "function"
    assert tool_call["function"]["name"] == "get"
    assert orjson.loads(tool_call["function"]["arguments"]) == {"query": "find it", "n": 1}
    assert data["usage"] == {"prompt_tokens": 4, "completion_tokens": 13, "total_tokens": 17}


async def test_openai_length_finish(http: ClientSession, base_url: str) -> None:
    body = {"model": "m", "max_completion_tokens": 2, "messages": user("one two three")}
    async with http.post(f"{base_url}/v1/chat/completions", json=body) as resp:
        data = await resp.json()
    assert data["choices"][0]["message"]["content"] == "echo: one"
    assert data["choices"][0]["finish_reason"] == "length"


async def test_openai_stream_chunks(http: ClientSession, base_url: str) -> None:
    body = {
        "model": "m",
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": user("go far [[fake:tool=run,tools=2]]"),
    }
    async with http.post(f"{base_url}/v1/chat/completions", json=body) as resp:
        assert resp.content_type == "text/event-stream"
        lines = openai_lines(await resp.read())
    assert lines[-1] == "[DONE]"
    *chunks, usage_chunk, _ = lines
    assert all(c["object"] == "chat.completion.chunk" for c in [*chunks, usage_chunk])
    assert all(c["usage"] is None for c in chunks)  # include_usage: null until the last chunk
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert "".join(d.get("content", "") for d in deltas) == "echo: go far"
    arguments: dict[int, list[str]] = {}
    for delta in deltas:
        for call in delta.get("tool_calls", []):
            arguments.setdefault(call["index"], []).append(call["function"]["arguments"])
    assert sorted(arguments) == [0, 1]
    for index, parts in arguments.items():
        assert len([p for p in parts if p]) >= 3
        assert orjson.loads("".join(parts)) == {"query": "go far", "n": index + 1}
    assert [c["choices"][0]["finish_reason"] for c in chunks][-2:] == [None, "tool_calls"]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {"prompt_tokens": 3, "completion_tokens": 23, "total_tokens": 26}


async def test_openai_errors(http: ClientSession, base_url: str) -> None:
    url = f"{base_url}/v1/chat/completions"
    async with http.post(
        url, json={"model": "m", "messages": user("x [[fake:status=429,retry_after=1]]")}
    ) as resp:
        assert (resp.status, resp.headers["retry-after"]) == (429, "1")
        error = (await resp.json())["error"]
    assert (
        error["message"] == "fake provider failure 429" and error["code"] == "rate_limit_exceeded"
    )
    async with http.post(url, json={"messages": user("x")}) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["type"] == "invalid_request_error"
    body = {"model": "m", "stream": True, "messages": user("a b c [[fake:error_after=1]]")}
    async with http.post(url, json=body) as resp:
        lines = openai_lines(await resp.read())
    assert lines[-1]["error"]["message"] == "fake provider failure mid-stream"
    assert [ln["choices"][0]["delta"].get("content") for ln in lines[:-1]] == ["", "echo: "]
    assert "usage" not in lines[0]


async def test_fail_memory_is_per_path(
    client: anthropic.AsyncAnthropic, http: ClientSession, base_url: str
) -> None:
    text = "shared [[fake:fail_once=502]]"
    async with http.post(
        f"{base_url}/v1/chat/completions", json={"model": "m", "messages": user(text)}
    ) as resp:
        assert resp.status == 502
    with pytest.raises(anthropic.InternalServerError):
        await client.messages.create(model="m", max_tokens=10, messages=user(text))


# --- the command line ---------------------------------------------------------------------------


async def test_module_runs_and_serves(http: ClientSession) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fakeprovider", "--port", "0", stdout=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), timeout=10)).decode()
        assert line.startswith("fakeprovider listening on http://127.0.0.1:")
        async with http.get(f"{line.split()[-1]}/healthz") as resp:
            assert resp.status == 200
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), timeout=5) == 0
