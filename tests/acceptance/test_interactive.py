"""Sync and SSE streaming requests through the worker tier, end to end: the fake provider,
`ferry migrate`, `ferry api` and `ferry worker` processes, driven with the official anthropic
SDK (and with raw aiohttp where the bytes on the wire are the point)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import orjson
import pytest
import pytest_asyncio
from anthropic.types import Message

from tests.acceptance.interactive_support import (
    FERRY_HEADERS,
    SMALL_POOLS,
    echo,
    gather_bounded,
    history_rows,
    parse_sse,
    post_raw,
    queue_depth,
    start_extra_api,
    unique_model,
    without_ids,
)
from tests.acceptance.jobs import MODEL, submit, unique, user
from tests.acceptance.stack import Stack, running_stack
from tests.conftest import TestRun
from tests.support import eventually, fake_calls, request_body

pytestmark = pytest.mark.acceptance

MAX_ATTEMPTS = 2  # FERRY_PROVIDER_MAX_ATTEMPTS of the shared stack's workers
MAX_RATE_LIMITED = 3  # FERRY_MAX_RATE_LIMITED of the same: 429s are not attempts


@pytest_asyncio.fixture(scope="module")
async def ferry(test_run: TestRun,
                tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    async with running_stack(test_run, tmp_path_factory.mktemp("ferry-interactive"),
                             "interactive", workers=2,
                             env={**SMALL_POOLS,
                                  "FERRY_PROVIDER_MAX_ATTEMPTS": str(MAX_ATTEMPTS),
                                  "FERRY_MAX_RATE_LIMITED": str(MAX_RATE_LIMITED)}) as stack:
        yield stack


@pytest_asyncio.fixture(scope="module")
async def client(ferry: Stack) -> AsyncIterator[anthropic.AsyncAnthropic]:
    sdk = ferry.client()
    yield sdk
    await sdk.close()



async def create(client: anthropic.AsyncAnthropic, text: str, model: str = MODEL,
                 **extra: Any) -> Message:
    return await client.messages.create(model=model, max_tokens=256, messages=user(text),
                                        **extra)


def comparable(message: Message) -> dict[str, Any]:
    """A message without its per-call ids."""
    data = message.model_dump(mode="json", exclude={"id"})
    for block in data["content"]:
        block.pop("id", None)
    return data


# --- sync -----------------------------------------------------------------------------------


async def test_create_answers_the_providers_text(client: anthropic.AsyncAnthropic) -> None:
    text = unique("hello there")
    message = await create(client, text)
    assert message.id.startswith("msg_fake_")
    assert (message.type, message.role, message.model) == ("message", "assistant", MODEL)
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text == f"echo: {text}"  # type: ignore[union-attr]
    assert message.stop_reason == "end_turn"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (3, 4)


async def test_a_sync_request_longer_than_the_workers_silence_limit_is_answered(
        client: anthropic.AsyncAnthropic) -> None:
    """A worker serving a sync request repeats "started" every 5 s; the api takes 15 s without
    one for a dead worker (tests/acceptance/test_worker_crash.py). A 20 s upstream call is
    answered, not cut off as dead."""
    text = unique("[[fake:delay=20]] patience")
    message = await create(client, text)
    assert message.content[0].text == echo(text)  # type: ignore[union-attr]


async def test_create_answers_several_text_blocks(client: anthropic.AsyncAnthropic) -> None:
    text = unique("[[fake:blocks=3]] three parts")
    message = await create(client, text)
    assert [block.text for block in message.content] == [  # type: ignore[union-attr]
        f"{echo(text)} [{i}]" for i in range(3)]
    assert message.stop_reason == "end_turn"


async def test_create_answers_a_tool_call(client: anthropic.AsyncAnthropic) -> None:
    text = unique("[[fake:tool=lookup]] find it")
    message = await create(client, text)
    assert [block.type for block in message.content] == ["text", "tool_use"]
    tool = message.content[1]
    assert tool.type == "tool_use"
    assert tool.name == "lookup" and tool.id.startswith("toolu_fake_")
    assert tool.input == {"query": echo(text).removeprefix("echo: "), "n": 1}
    assert message.stop_reason == "tool_use"


# --- streaming ------------------------------------------------------------------------------


async def test_text_stream_reconstructs_the_answer(client: anthropic.AsyncAnthropic) -> None:
    text = unique("stream me please")
    async with client.messages.stream(model=MODEL, max_tokens=256,
                                      messages=user(text)) as stream:
        pieces = [piece async for piece in stream.text_stream]
    assert len(pieces) > 1  # one delta per word: really streamed, not one blob
    assert "".join(pieces) == f"echo: {text}"


async def test_the_streams_final_message_equals_the_sync_answer(
    client: anthropic.AsyncAnthropic
) -> None:
    text = unique("[[fake:blocks=2,tool=lookup]] same either way")
    sync = await create(client, text)
    async with client.messages.stream(model=MODEL, max_tokens=256,
                                      messages=user(text)) as stream:
        streamed = await stream.get_final_message()
    assert streamed.id != sync.id  # a call each
    assert len(sync.content) == 3
    assert comparable(streamed) == comparable(sync)


async def test_a_tool_use_stream_delivers_the_parsed_input(
    client: anthropic.AsyncAnthropic
) -> None:
    text = unique("[[fake:tool=lookup,chunks=5]] search")
    async with client.messages.stream(model=MODEL, max_tokens=256,
                                      messages=user(text)) as stream:
        partials = [event.delta.partial_json async for event in stream  # type: ignore[union-attr]
                    if event.type == "content_block_delta"
                    and event.delta.type == "input_json_delta"]
        final = await stream.get_final_message()
    expected = {"query": echo(text).removeprefix("echo: "), "n": 1}
    assert len(partials) == 5
    assert "".join(partials) == orjson.dumps(expected).decode()
    assert final.content[-1].type == "tool_use"
    assert final.content[-1].input == expected
    assert final.stop_reason == "tool_use"


async def test_a_provider_error_mid_stream_raises_after_the_first_text(
    client: anthropic.AsyncAnthropic
) -> None:
    text = unique("[[fake:error_after=2]] one two three four")
    received: list[str] = []
    with pytest.raises(anthropic.APIStatusError) as raised:
        async with client.messages.stream(model=MODEL, max_tokens=256,
                                          messages=user(text)) as stream:
            async for piece in stream.text_stream:
                received.append(piece)
    assert received == ["echo: ", "one "]  # the two deltas before the failure
    body = dict(raised.value.body)  # type: ignore[call-overload]
    # The provider's own error event, relayed as it came (its request id included).
    assert body.pop("request_id").startswith("req_fake_")
    assert body == {"type": "error", "error": {
        "type": "overloaded_error", "message": "fake provider failure mid-stream"}}


async def test_the_sse_bytes_are_the_providers(ferry: Stack) -> None:
    body = request_body(unique("[[fake:chunks=4,tool=lookup]] byte for byte"), stream=True)
    direct, relayed = await asyncio.gather(
        post_raw(f"{ferry.fake_url}/v1/messages", body, FERRY_HEADERS),
        post_raw(f"{ferry.url}/anthropic/v1/messages", body, FERRY_HEADERS),
    )
    assert (direct.status, relayed.status) == (200, 200)
    assert relayed.content_type.startswith("text/event-stream")
    direct_events, relayed_events = parse_sse(direct.body), parse_sse(relayed.body)
    assert [name for name, _ in direct_events].count("content_block_delta") == 8  # 4 + 4
    assert "ping" in [name for name, _ in direct_events]
    assert direct_events[0][1]["message"]["id"] != relayed_events[0][1]["message"]["id"]
    # Same events, same order, same pings, same bytes: Ferry adds and reframes nothing.
    assert without_ids(relayed.body) == without_ids(direct.body)


# --- provider errors before the first byte ----------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["create", "stream"])
@pytest.mark.parametrize(("directive", "calls"), [
    # Ferry retries a rate limit itself (up to FERRY_MAX_RATE_LIMITED times: a 429 is not an
    # attempt), then tells the SDK not to retry on top of that.
    pytest.param("[[fake:status=429,retry_after=0]]", MAX_RATE_LIMITED, id="retried"),
    # A 429 without retry-after is a spend cap: no retry lifts it, Ferry's or the SDK's.
    pytest.param("[[fake:status=429]]", 1, id="spend_cap"),
])
async def test_a_rate_limited_provider_is_a_rate_limit_error(
    ferry: Stack, client: anthropic.AsyncAnthropic, stream: bool, directive: str, calls: int
) -> None:
    text = unique(f"{directive} too many")
    with pytest.raises(anthropic.RateLimitError) as raised:
        if stream:
            async with client.messages.stream(model=MODEL, max_tokens=64,
                                              messages=user(text)) as events:
                await events.get_final_message()
        else:
            await create(client, text)
    assert raised.value.status_code == 429
    body = dict(raised.value.body)  # type: ignore[call-overload]
    assert body.pop("request_id", None) == raised.value.response.headers["request-id"]
    assert body == {"type": "error", "error": {
        "type": "rate_limit_error", "message": "fake provider failure 429"}}
    assert raised.value.response.headers["x-should-retry"] == "false"
    assert raised.value.response.headers["x-ferry-request-id"].startswith("req_")
    assert len(await fake_calls(ferry.fake_url, text)) == calls


@pytest.mark.parametrize("stream", [False, True], ids=["create", "stream"])
async def test_a_rejected_request_is_a_bad_request_not_retried(
    ferry: Stack, client: anthropic.AsyncAnthropic, stream: bool
) -> None:
    text = unique("[[fake:status=400]] nonsense")
    with pytest.raises(anthropic.BadRequestError) as raised:
        if stream:
            async with client.messages.stream(model=MODEL, max_tokens=64,
                                              messages=user(text)) as events:
                await events.get_final_message()
        else:
            await create(client, text)
    body = dict(raised.value.body)  # type: ignore[call-overload]
    # The provider's error body and request id, relayed; Ferry's own id beside it.
    assert body.pop("request_id") == raised.value.response.headers["request-id"]
    assert body == {"type": "error", "error": {
        "type": "invalid_request_error", "message": "fake provider failure 400"}}
    assert raised.value.response.headers["request-id"].startswith("req_fake_")
    assert raised.value.response.headers["x-ferry-request-id"].startswith("req_")
    assert len(await fake_calls(ferry.fake_url, text)) == 1


# --- pings ----------------------------------------------------------------------------------


async def test_a_silent_stream_gets_pings(ferry: Stack) -> None:
    # The api decides about pings: a second api replica with a short interval, same workers.
    api = await start_extra_api(ferry, "api-pings", FERRY_PING_INTERVAL="0.3")
    body = request_body(unique("[[fake:stream_delay=0.75,chunks=1]] quiet"), stream=True)
    direct, relayed = await asyncio.gather(
        post_raw(f"{ferry.fake_url}/v1/messages", body, FERRY_HEADERS),
        post_raw(f"{api}/anthropic/v1/messages", body, FERRY_HEADERS),
    )
    direct_events = parse_sse(without_ids(direct.body))
    relayed_events = parse_sse(without_ids(relayed.body))
    pings = [data for name, data in relayed_events if name == "ping"]
    assert len(pings) >= direct_events.count(("ping", {"type": "ping"})) + 1
    assert all(data == {"type": "ping"} for data in pings)
    # Pings are only added: everything else is the provider's stream, in order.
    assert [e for e in relayed_events if e[0] != "ping"] == \
        [e for e in direct_events if e[0] != "ping"]


# --- cancellation ---------------------------------------------------------------------------


async def test_a_client_leaving_mid_stream_cancels_the_provider_call(ferry: Stack) -> None:
    text = unique("[[fake:stream_delay=0.5]] I will not stay")
    events = 0
    async with aiohttp.ClientSession() as http, http.post(
            f"{ferry.url}/anthropic/v1/messages", data=request_body(text, stream=True),
            headers=FERRY_HEADERS) as resp:
        assert resp.status == 200
        async for line in resp.content:
            events += line == b"\n"
            if events == 2:
                break
        resp.close()  # drop the connection mid-stream

    async def cancelled() -> bool:
        calls = await fake_calls(ferry.fake_url, text)
        return len(calls) == 1 and calls[0]["cancelled"] and not calls[0]["finished"]

    await eventually(cancelled, timeout=10, what="the provider call to be cancelled")


async def test_a_client_leaving_a_sync_request_cancels_the_provider_call(
    ferry: Stack, client: anthropic.AsyncAnthropic
) -> None:
    text = unique("[[fake:delay=5]] never mind")
    request = asyncio.create_task(create(client, text))

    async def called() -> bool:
        return bool(await fake_calls(ferry.fake_url, text))

    await eventually(called, timeout=10, what="the provider to be called")
    await asyncio.sleep(0.5)
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request

    async def cancelled() -> bool:
        calls = await fake_calls(ferry.fake_url, text)
        return len(calls) == 1 and calls[0]["cancelled"] and not calls[0]["finished"]

    await eventually(cancelled, timeout=4, what="the provider call to be cancelled")


# --- job history ----------------------------------------------------------------------------


async def test_sync_and_stream_requests_are_recorded_in_the_job_history(
    ferry: Stack, client: anthropic.AsyncAnthropic
) -> None:
    model = unique_model("claude-history")
    sync = await create(client, unique("first recorded"), model=model)
    async with client.messages.stream(model=model, max_tokens=256,
                                      messages=user(unique("[[fake:tool=lookup]] second"))
                                      ) as stream:
        streamed = await stream.get_final_message()
    with pytest.raises(anthropic.BadRequestError):
        await create(client, unique("[[fake:status=400]] third"), model=model)

    async def three_rows() -> list[Any]:
        rows = await history_rows(ferry.database_url, model)
        return rows if len(rows) == 3 else []

    rows = await eventually(three_rows, timeout=10, what="three history rows")
    by_mode = {(r["mode"], r["status"]): r for r in rows}
    assert set(by_mode) == {("sync", "completed"), ("stream", "completed"), ("sync", "failed")}
    for row, message in ((by_mode["sync", "completed"], sync),
                         (by_mode["stream", "completed"], streamed)):
        assert (row["input_tokens"], row["output_tokens"]) == (
            message.usage.input_tokens, message.usage.output_tokens)
        assert row["stop_reason"] == message.stop_reason
        assert (row["provider"], row["served_provider"], row["served_model"]) == (
            "anthropic", "anthropic", model)
        assert row["attempts"] == 1 and row["http_status"] is None
        assert row["completed_at"] >= row["submitted_at"]
    failed = by_mode["sync", "failed"]
    assert (failed["http_status"], failed["error_type"], failed["attempts"]) == (
        400, "invalid_request_error", 1)


# --- stacks of their own ----------------------------------------------------------------------


async def test_without_a_worker_a_request_is_overloaded_and_never_runs(
    test_run: TestRun, tmp_path: Path
) -> None:
    async with running_stack(test_run, tmp_path, "noworker", workers=0,
                             env={**SMALL_POOLS, "FERRY_PICKUP_TIMEOUT": "1"}) as stack:
        async with stack.client() as client:
            text = unique("anybody there")
            started = time.monotonic()
            with pytest.raises(anthropic.APIStatusError) as raised:
                await create(client, text)
            waited = time.monotonic() - started
            assert raised.value.status_code == 529
            assert isinstance(raised.value, anthropic.InternalServerError)
            assert raised.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
            assert 0.9 <= waited < 5, waited  # the pickup timeout, not the request timeout

            stack.start("worker-1", "worker")
            await stack.wait_consumers(["worker-1"])
            later = unique("now there is")
            assert (await create(client, later)).content[0].text == f"echo: {later}"  # type: ignore[union-attr]
            await asyncio.sleep(2)  # time for a stale copy of the request to surface
            assert await fake_calls(stack.fake_url, text) == []
            assert len(await fake_calls(stack.fake_url, later)) == 1


async def test_a_backed_up_async_lane_does_not_delay_sync_requests(
    test_run: TestRun, tmp_path: Path
) -> None:
    async with running_stack(test_run, tmp_path, "lanes", workers=1,
                             env={"FERRY_DB_POOL_SIZE": "10",
                                  "FERRY_WORKER_CONCURRENCY": "20"}) as stack:
        async with stack.client() as client:
            await gather_bounded(100, *(submit(client, f"[[fake:delay=3]] backlog {i}")
                                        for i in range(2000)))
            assert await queue_depth(stack, "jobs") > 1000  # 20 in flight, the rest waiting

            text = unique("[[fake:delay=0.5]] me first")
            started = time.monotonic()
            message = await create(client, text)
            elapsed = time.monotonic() - started
            assert message.content[0].text == echo(text)  # type: ignore[union-attr]
            # Behind the backlog it would take minutes; the bound is deliberately generous.
            assert elapsed < 3.5, elapsed
            assert await queue_depth(stack, "jobs") > 1000  # the backlog is still there
