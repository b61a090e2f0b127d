"""Streams always end: whatever the upstream does mid-stream (an error event, a dropped
connection, silence, an enormous line), the client's stream ends promptly with an `error`
event after every event that did arrive, and a silent upstream call is cancelled."""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson
import pytest
import pytest_asyncio

from tests.acceptance.interactive_support import FERRY_HEADERS, parse_sse, post_raw
from tests.acceptance.jobs import MODEL, unique
from tests.acceptance.stack import Stack, running_stack
from tests.conftest import TestRun
from tests.support import eventually, fake_calls

pytestmark = pytest.mark.acceptance

IDLE_S = 2


@pytest_asyncio.fixture(scope="module")
async def ferry(test_run: TestRun, tmp_path_factory: pytest.TempPathFactory
                ) -> AsyncIterator[Stack]:
    async with running_stack(test_run, tmp_path_factory.mktemp("ferry-stream-faults"),
                             "streamfaults", workers=1,
                             env={"FERRY_STREAM_IDLE_TIMEOUT": str(IDLE_S),
                                  "FERRY_PING_INTERVAL": "0.5",
                                  "FERRY_PROVIDER_MAX_ATTEMPTS": "1"}) as stack:
        yield stack


async def stream(stack: Stack, text: str) -> list[tuple[str, dict[str, object]]]:
    body = orjson.dumps({"model": MODEL, "max_tokens": 256, "stream": True,
                         "messages": [{"role": "user", "content": text}]})
    raw = await post_raw(f"{stack.url}/anthropic/v1/messages", body, FERRY_HEADERS)
    assert raw.status == 200, raw.body[:500]
    return parse_sse(raw.body)


def texts(events: list[tuple[str, dict[str, object]]]) -> list[str]:
    return [data["delta"]["text"] for name, data in events  # type: ignore[index]
            if name == "content_block_delta" and data["delta"]["type"] == "text_delta"]  # type: ignore[index]


async def test_an_upstream_error_event_ends_the_stream(ferry: Stack) -> None:
    events = await stream(ferry, unique("[[fake:error_after=2]] one two three"))
    assert texts(events) == ["echo: ", "one "]
    assert events[-1][0] == "error"  # the last event: no pings, no second error
    assert [name for name, _ in events].count("error") == 1
    assert "ping" not in [name for name, _ in events[-3:]]


async def test_a_dropped_upstream_connection_ends_the_stream_after_what_arrived(
    ferry: Stack
) -> None:
    events = await stream(ferry, unique("[[fake:drop_after=3]] one two three four"))
    assert texts(events) == ["echo: ", "one ", "two "]
    name, data = events[-1]
    assert name == "error"
    assert data["error"] == {  # type: ignore[comparison-overlap]
        "type": "api_error",
        "message": "the connection to provider `anthropic` broke mid-stream "
                   "(ClientPayloadError)"}


async def test_a_silent_upstream_is_cut_at_the_idle_timeout_and_its_call_cancelled(
    ferry: Stack
) -> None:
    text = unique("[[fake:stall_after=1]] then nothing")
    events = await stream(ferry, text)
    assert texts(events) == ["echo: "]
    name, data = events[-1]
    assert name == "error" and data["error"]["type"] == "timeout_error"  # type: ignore[index]
    # Whichever notices first: the api's idle timeout, or the worker's read timeout (both are
    # FERRY_STREAM_IDLE_TIMEOUT).
    assert data["error"]["message"] in (  # type: ignore[index]
        "the provider stream went idle", "provider `anthropic` stopped sending")

    async def cancelled() -> bool:
        [call] = await fake_calls(ferry.fake_url, text)
        return bool(call["cancelled"])

    # Ferry told the worker, which closed the upstream connection (not after 600 s).
    await eventually(cancelled, what="the upstream call to be cancelled")


async def test_a_line_larger_than_any_buffer_is_relayed(ferry: Stack) -> None:
    size = 600 * 1024
    events = await stream(ferry, unique(f"[[fake:huge_delta={size}]] big"))
    pieces = texts(events)
    assert len(pieces[0]) == size
    assert events[-1][0] == "message_stop"
