"""A misbehaving upstream: dropped and stalled streams, huge deltas, bodies that are not JSON."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import anthropic
import orjson
import pytest
import pytest_asyncio
from aiohttp import ClientSession, web

from fakeprovider.server import create_app
from fakeprovider.state import STATE
from tests.unit.test_fake_provider import openai_lines, sse_frames, user

Json = dict[str, Any]
DELTA = b"event: content_block_delta\n"


@pytest_asyncio.fixture(autouse=True)
async def clean(base_url: str, http: ClientSession) -> None:
    async with http.delete(f"{base_url}/_fake/calls") as resp:
        assert resp.status == 204


async def the_call(url: str, http: ClientSession, check: Callable[[Json], bool]) -> Json:
    """Wait for the only recorded call to satisfy `check` (a handler learns of a disconnect a
    moment after the client leaves). The deadline only ends a failing test."""
    deadline = time.monotonic() + 30
    while True:
        async with http.get(f"{url}/_fake/calls") as resp:
            [call] = await resp.json()
        if check(call) or time.monotonic() > deadline:
            assert check(call), call
            return call
        await asyncio.sleep(0.02)


def anthropic_stream(prompt: str) -> Json:
    return {"model": "m", "max_tokens": 100, "stream": True, "messages": user(prompt)}


def openai_stream(prompt: str) -> Json:
    return {"model": "m", "stream": True, "messages": user(prompt)}


async def read_until_broken(resp: aiohttp.ClientResponse) -> bytes:
    received = b""
    with pytest.raises(aiohttp.ClientPayloadError):
        async for chunk in resp.content.iter_any():
            received += chunk
    return received


# --- drop_after ---------------------------------------------------------------------------------


async def test_drop_after_cuts_the_connection(http: ClientSession, base_url: str) -> None:
    body = anthropic_stream("a b c d [[fake:drop_after=2]]")
    async with http.post(f"{base_url}/v1/messages", json=body) as resp:
        assert resp.status == 200
        received = await read_until_broken(resp)
    frames = sse_frames(received)  # whole events only, then nothing: no closing chunk
    assert [name for name, _ in frames] == [
        "message_start",
        "content_block_start",
        "ping",
        "content_block_delta",
        "content_block_delta",
    ]
    assert [f["delta"]["text"] for _, f in frames[3:]] == ["echo: ", "a "]
    call = await the_call(base_url, http, lambda c: c["fault"] is not None)
    assert (call["fault"], call["status"], call["finished"], call["cancelled"]) == (
        "drop_after",
        200,
        False,
        False,
    )


async def test_drop_after_more_deltas_than_the_answer_has_drops_at_the_tail(
    http: ClientSession, base_url: str
) -> None:
    body = anthropic_stream("a [[fake:drop_after=50]]")
    async with http.post(f"{base_url}/v1/messages", json=body) as resp:
        received = await read_until_broken(resp)
    names = [name for name, _ in sse_frames(received)]
    assert names[-1] == "content_block_stop" and "message_delta" not in names


async def test_the_sdk_sees_a_dropped_stream_as_a_broken_transfer(base_url: str) -> None:
    async with anthropic.AsyncAnthropic(base_url=base_url, api_key="k", max_retries=0) as sdk:
        texts: list[str] = []
        with pytest.raises(Exception) as raised:
            async with sdk.messages.stream(
                model="m", max_tokens=100, messages=user("a b c [[fake:drop_after=1]]")
            ) as stream:
                async for text in stream.text_stream:
                    texts.append(text)
    assert texts == ["echo: "]
    # The SDK's HTTP transport reports the missing end of the chunked body as it is: raised as
    # such by older SDKs, as the cause of an APIConnectionError by newer ones (2.17).
    chain: list[BaseException] = []
    error: BaseException | None = raised.value
    while error is not None:
        chain.append(error)
        error = error.__cause__
    assert type(chain[0]).__name__ in ("RemoteProtocolError", "APIConnectionError")
    broken = [e for e in chain if type(e).__name__ == "RemoteProtocolError"]
    assert broken and "incomplete chunked read" in str(broken[0])


async def test_openai_drop_after(http: ClientSession, base_url: str) -> None:
    body = openai_stream("a b c [[fake:drop_after=1,tool=t]]")
    async with http.post(f"{base_url}/v1/chat/completions", json=body) as resp:
        received = await read_until_broken(resp)
    deltas = [line["choices"][0]["delta"] for line in openai_lines(received)]
    assert deltas == [{"role": "assistant", "content": ""}, {"content": "echo: "}]


# --- stall_after --------------------------------------------------------------------------------


async def read_events(resp: aiohttp.ClientResponse, marker: bytes, count: int) -> bytes:
    """Read until `count` events containing `marker` have arrived (and no further)."""
    received = b""
    while received.count(marker) < count or not received.endswith(b"\n\n"):
        chunk = await resp.content.readany()
        assert chunk, received  # the stream must not end
        received += chunk
    return received


async def stalled_call(
    url: str, http: ClientSession, body: Json, path: str, marker: bytes, count: int
) -> tuple[bytes, Json]:
    """What arrived before the stall, and the call once the client has left."""
    async with http.post(f"{url}{path}", json=body) as resp:
        assert resp.status == 200
        received = await read_events(resp, marker, count)
        call = await the_call(url, http, lambda c: c["fault"] == "stall_after")
        assert (call["finished"], call["cancelled"]) == (False, False)
        assert not resp.content.at_eof()
    # Leaving the block closes the connection mid-body: the fake notices the client left.
    return received, await the_call(url, http, lambda c: c["cancelled"])


async def test_stall_after_holds_the_stream_until_the_client_leaves(
    http: ClientSession, base_url: str
) -> None:
    body = anthropic_stream("a b c d [[fake:stall_after=2]]")
    received, call = await stalled_call(base_url, http, body, "/v1/messages", DELTA, 2)
    frames = sse_frames(received)
    assert [f["delta"]["text"] for name, f in frames if name == "content_block_delta"] == [
        "echo: ",
        "a ",
    ]
    assert (call["fault"], call["status"], call["finished"]) == ("stall_after", 200, False)


async def test_openai_stall_after(http: ClientSession, base_url: str) -> None:
    body = openai_stream("a b c d [[fake:stall_after=2]]")
    path = "/v1/chat/completions"
    received, call = await stalled_call(base_url, http, body, path, b'"content":"', 3)
    deltas = [line["choices"][0]["delta"] for line in openai_lines(received)]
    assert deltas == [
        {"role": "assistant", "content": ""},
        {"content": "echo: "},
        {"content": "a "},
    ]
    assert (call["fault"], call["status"]) == ("stall_after", 200)


@pytest_asyncio.fixture
async def runner_url(request: pytest.FixtureRequest) -> AsyncIterator[tuple[web.AppRunner, str]]:
    runner = web.AppRunner(create_app(), handler_cancellation=request.param)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield runner, f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


@pytest.mark.parametrize("runner_url", [False], indirect=True)
async def test_stall_notices_the_client_leaving_without_handler_cancellation(
    http: ClientSession, runner_url: tuple[web.AppRunner, str]
) -> None:
    _, url = runner_url
    body = anthropic_stream("a b c [[fake:stall_after=2]]")
    received, call = await stalled_call(url, http, body, "/v1/messages", DELTA, 2)
    assert received.count(DELTA) == 2 and call["fault"] == "stall_after"


@pytest.mark.parametrize("runner_url", [True], indirect=True)
async def test_shutdown_releases_a_stalled_stream(
    http: ClientSession, runner_url: tuple[web.AppRunner, str]
) -> None:
    runner, url = runner_url
    app = runner.app
    body = anthropic_stream("a b [[fake:stall_after=1]]")
    async with http.post(f"{url}/v1/messages", json=body) as resp:
        await read_events(resp, DELTA, 1)
        await the_call(url, http, lambda c: c["fault"] == "stall_after")
        await runner.cleanup()
        # Cut, not finished: the client sees a broken transfer rather than an ended stream.
        await read_until_broken(resp)
    [call] = app[STATE].calls
    # Released by the shutdown, not cancelled by aiohttp after its shutdown timeout.
    assert (call.fault, call.finished, call.cancelled) == ("stall_after", False, False)


# --- huge_delta ---------------------------------------------------------------------------------

HUGE = 600 * 1024  # above the 512 KiB line limit some SSE readers have
FILLER = "x" * (HUGE - 1) + " "


async def test_huge_delta_sends_one_giant_line(http: ClientSession, base_url: str) -> None:
    body = anthropic_stream(f"hi [[fake:huge_delta={HUGE}]]")
    async with http.post(f"{base_url}/v1/messages", json=body) as resp:
        raw = await resp.read()
    frames = sse_frames(raw)
    texts = [f["delta"]["text"] for name, f in frames if name == "content_block_delta"]
    assert texts[0] == FILLER and len(texts[0].encode()) == HUGE
    assert "".join(texts) == FILLER + "echo: hi"
    longest = max(raw.split(b"\n"), key=len)
    assert longest.startswith(b"data: ") and len(longest) > HUGE > 512 * 1024


async def test_huge_delta_reaches_sdk_and_plain_answers(base_url: str) -> None:
    async with anthropic.AsyncAnthropic(base_url=base_url, api_key="k", max_retries=0) as sdk:
        request: Json = {
            "model": "m",
            "max_tokens": 100,
            "messages": user(f"hi [[fake:huge_delta={HUGE}]]"),
        }
        async with sdk.messages.stream(**request) as stream:
            streamed = [text async for text in stream.text_stream]
        plain = await sdk.messages.create(**request)
    assert streamed[0] == FILLER and "".join(streamed) == FILLER + "echo: hi"
    assert plain.content[0].text == FILLER + "echo: hi"  # type: ignore[union-attr]
    assert plain.usage.output_tokens == 1 + 2  # the filler is one word


async def test_openai_huge_delta(http: ClientSession, base_url: str) -> None:
    body = openai_stream("hi [[fake:huge_delta=1000]]")
    async with http.post(f"{base_url}/v1/chat/completions", json=body) as resp:
        lines = openai_lines(await resp.read())
    contents = [ln["choices"][0]["delta"].get("content") for ln in lines[:-1]]
    assert contents[:3] == ["", "x" * 999 + " ", "echo: "]


# --- bad_json and misplaced directives ----------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "start"),
    [("/v1/messages", b'{"id":"msg_fake_'), ("/v1/chat/completions", b'{"id":"chatcmpl-fake-')],
)
async def test_bad_json_answers_200_with_a_broken_body(
    http: ClientSession, base_url: str, path: str, start: bytes
) -> None:
    body = {"model": "m", "max_tokens": 10, "messages": user("hi [[fake:bad_json]]")}
    async with http.post(f"{base_url}{path}", json=body) as resp:
        assert (resp.status, resp.content_type) == (200, "application/json")
        raw = await resp.read()
    assert raw.startswith(start)
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(raw)
    call = await the_call(base_url, http, lambda c: c["finished"])
    assert (call["fault"], call["status"]) == ("bad_json", 200)


async def test_the_sdk_fails_on_bad_json(base_url: str) -> None:
    async with anthropic.AsyncAnthropic(base_url=base_url, api_key="k", max_retries=0) as sdk:
        with pytest.raises(ValueError, match="Unterminated|Expecting"):  # the JSON decoder's
            await sdk.messages.create(
                model="m", max_tokens=10, messages=user("hi [[fake:bad_json]]")
            )


@pytest.mark.parametrize(
    ("prompt", "stream"),
    [
        ("[[fake:drop_after=1]]", False),
        ("[[fake:stall_after=1]]", False),
        ("[[fake:bad_json]]", True),
        ("[[fake:bad_json=yes]]", False),
        ("[[fake:huge_delta=0]]", True),
        ("[[fake:drop_after=-1]]", True),
        ("[[fake:stal_after=1]]", True),
    ],
)
async def test_misplaced_or_malformed_fault_directives_are_refused(
    http: ClientSession, base_url: str, prompt: str, stream: bool
) -> None:
    body = {"model": "m", "max_tokens": 10, "stream": stream, "messages": user(prompt)}
    async with http.post(f"{base_url}/v1/messages", json=body) as resp:
        assert resp.status == 400
        error = await resp.json()
    assert error["error"]["type"] == "invalid_request_error"
    assert "fake directive" in error["error"]["message"]


async def test_error_after_still_wins_when_it_comes_first(
    http: ClientSession, base_url: str
) -> None:
    body = anthropic_stream("a b c [[fake:error_after=1,drop_after=3]]")
    async with http.post(f"{base_url}/v1/messages", json=body) as resp:
        frames = sse_frames(await resp.read())
    assert frames[-1][0] == "error"
    assert [name for name, _ in frames].count("content_block_delta") == 1
    call = await the_call(base_url, http, lambda c: c["status"] is not None)
    assert call["fault"] == "error_after"
