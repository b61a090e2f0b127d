"""Thinking, stop sequences, cumulative usage and count_tokens, through the SDK and raw bytes."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import orjson
import pytest
import pytest_asyncio
from aiohttp import ClientSession

from fakeprovider.answer import cut_at_stop
from tests.unit.test_fake_provider import openai_lines, sse_frames, user

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


async def post(http: ClientSession, url: str, body: Json) -> tuple[int, bytes]:
    async with http.post(url, json=body) as resp:
        return resp.status, await resp.read()


def signature(text: str) -> str:
    return base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()


# --- thinking -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "thinking",
    [
        {"type": "enabled", "budget_tokens": 1024},
        {"type": "adaptive"},
        {"type": "adaptive", "display": "summarized"},
    ],
)
async def test_thinking_comes_first_with_a_signature(
    client: anthropic.AsyncAnthropic, thinking: Any
) -> None:
    message = await client.messages.create(
        model="m", max_tokens=100, messages=user("why sky blue"), thinking=thinking
    )
    assert [b.model_dump() for b in message.content] == [
        {
            "type": "thinking",
            "thinking": "thinking about: why sky blue",
            "signature": signature("thinking about: why sky blue"),
        },
        {"type": "text", "text": "echo: why sky blue", "citations": None},
    ]
    assert (message.stop_reason, message.usage.output_tokens) == ("end_turn", 5 + 4)


async def test_omitted_thinking_is_empty_but_signed_and_billed(
    client: anthropic.AsyncAnthropic,
) -> None:
    message = await client.messages.create(
        model="m",
        max_tokens=100,
        messages=user("why sky blue"),
        thinking={"type": "adaptive", "display": "omitted"},  # type: ignore[typeddict-unknown-key]
    )
    thinking, text = message.content
    assert thinking.type == "thinking" and thinking.thinking == ""
    assert thinking.signature == signature("thinking about: why sky blue")
    assert text.type == "text" and text.text == "echo: why sky blue"
    assert message.usage.output_tokens == 5 + 4  # the hidden thinking is paid for


@pytest.mark.parametrize("thinking", [None, {"type": "disabled"}])
async def test_no_thinking_unless_asked(http: ClientSession, base_url: str, thinking: Any) -> None:
    body: Json = {"model": "m", "max_tokens": 50, "messages": user("hi")}
    if thinking is not None:
        body["thinking"] = thinking
    status, raw = await post(http, f"{base_url}/v1/messages", body)
    assert status == 200
    assert [b["type"] for b in orjson.loads(raw)["content"]] == ["text"]


async def test_streamed_thinking_events(http: ClientSession, base_url: str) -> None:
    body = {
        "model": "m",
        "max_tokens": 100,
        "stream": True,
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "messages": user("a b"),
    }
    status, raw = await post(http, f"{base_url}/v1/messages", body)
    assert status == 200
    frames = sse_frames(raw)
    block0 = [f for name, f in frames if f.get("index") == 0]
    assert block0[0] == {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "thinking", "thinking": "", "signature": ""},
    }
    deltas = [f["delta"] for f in block0 if f["type"] == "content_block_delta"]
    assert [d["type"] for d in deltas] == ["thinking_delta"] * 4 + ["signature_delta"]
    assert "".join(d.get("thinking", "") for d in deltas) == "thinking about: a b"
    assert deltas[-1]["signature"] == signature("thinking about: a b")
    assert block0[-1] == {"type": "content_block_stop", "index": 0}
    assert frames[-2][1]["usage"]["output_tokens"] == 4 + 3


async def test_streamed_omitted_thinking_sends_only_the_signature(
    http: ClientSession, base_url: str
) -> None:
    body = {
        "model": "m",
        "max_tokens": 100,
        "stream": True,
        "thinking": {"type": "adaptive", "display": "omitted"},
        "messages": user("a b"),
    }
    _, raw = await post(http, f"{base_url}/v1/messages", body)
    deltas = [f["delta"] for _, f in sse_frames(raw) if f.get("index") == 0 and "delta" in f]
    assert deltas == [{"type": "signature_delta", "signature": signature("thinking about: a b")}]


async def test_sdk_rebuilds_streamed_thinking(client: anthropic.AsyncAnthropic) -> None:
    request: Json = {
        "model": "m",
        "max_tokens": 100,
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "messages": user("stream my thoughts [[fake:tool=t,chunks=2]]"),
    }
    plain = await client.messages.create(**request)
    async with client.messages.stream(**request) as stream:
        final = await stream.get_final_message()
    dump = [b.model_dump(exclude={"id"}) for b in final.content]
    assert dump == [b.model_dump(exclude={"id"}) for b in plain.content]
    assert [b.type for b in final.content] == ["thinking", "text", "tool_use"]
    assert final.usage.output_tokens == plain.usage.output_tokens == 5 + 4 + 10


@pytest.mark.parametrize(
    ("max_tokens", "thinking", "texts"),
    [
        # The thinking spends the budget first, as on Anthropic: cut mid-thought, no text.
        (2, "thinking about:", []),
        # Thinking whole (5 words), then the text cut: one word of it fits.
        (6, "thinking about: one two three", ["echo:"]),
    ],
)
async def test_max_tokens_counts_thinking(
    client: anthropic.AsyncAnthropic, max_tokens: int, thinking: str, texts: list[str]
) -> None:
    message = await client.messages.create(
        model="m",
        max_tokens=max_tokens,
        messages=user("one two three [[fake:tool=t]]"),
        thinking={"type": "enabled", "budget_tokens": 1},
    )
    first, *rest = message.content
    assert first.type == "thinking" and first.thinking == thinking
    assert first.signature == signature(thinking)
    assert [b.text for b in rest if b.type == "text"] == texts
    assert len(rest) == len(texts)  # no tool call either
    assert (message.stop_reason, message.usage.output_tokens) == ("max_tokens", max_tokens)


# --- stop sequences -----------------------------------------------------------------------------


def test_the_first_completed_stop_sequence_wins() -> None:
    assert cut_at_stop(["echo: wxyz"], ("xyz", "y")) == (["echo: wx"], "y")
    assert cut_at_stop(["echo: wxyz"], ("yz", "xyz")) == (["echo: w"], "xyz")
    assert cut_at_stop(["ab", "cd", "ef"], ("e", "d")) == (["ab", "c"], "d")
    assert cut_at_stop(["one"], ("z",)) == (["one"], None)
    assert cut_at_stop(["echo: x"], ("echo",)) == ([""], "echo")


async def test_stop_sequence_cuts_the_text(client: anthropic.AsyncAnthropic) -> None:
    message = await client.messages.create(
        model="m",
        max_tokens=100,
        messages=user("say hello STOP world [[fake:tool=t,blocks=2]]"),
        stop_sequences=["world", "STOP"],
    )
    # Generation ends at the match: the second block and the tool call never come.
    assert [b.model_dump() for b in message.content] == [
        {"type": "text", "text": "echo: say hello ", "citations": None}
    ]
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", "STOP")
    assert message.usage.output_tokens == 3


async def test_max_tokens_reached_before_the_stop_sequence(
    client: anthropic.AsyncAnthropic,
) -> None:
    message = await client.messages.create(
        model="m", max_tokens=2, messages=user("a b c STOP"), stop_sequences=["STOP"]
    )
    assert message.content[0].text == "echo: a"  # type: ignore[union-attr]
    assert (message.stop_reason, message.stop_sequence) == ("max_tokens", None)


async def test_streamed_stop_sequence(http: ClientSession, base_url: str) -> None:
    body = {
        "model": "m",
        "max_tokens": 100,
        "stream": True,
        "stop_sequences": ["##"],
        "messages": user("one ## two"),
    }
    _, raw = await post(http, f"{base_url}/v1/messages", body)
    frames = sse_frames(raw)
    text = "".join(f["delta"]["text"] for name, f in frames if name == "content_block_delta")
    assert text == "echo: one "
    assert frames[-2][1]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "##"}


async def test_bad_stop_sequences_are_refused(http: ClientSession, base_url: str) -> None:
    body = {"model": "m", "max_tokens": 5, "stop_sequences": "##", "messages": user("x")}
    status, raw = await post(http, f"{base_url}/v1/messages", body)
    assert status == 400 and orjson.loads(raw)["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("stop", ["STOP", ["nothing", "STOP"]])
async def test_openai_stop_cuts_with_finish_reason_stop(
    http: ClientSession, base_url: str, stop: Any
) -> None:
    url = f"{base_url}/v1/chat/completions"
    body = {"model": "m", "stop": stop, "messages": user("a STOP b [[fake:tool=t]]")}
    status, raw = await post(http, url, body)
    assert status == 200
    [choice] = orjson.loads(raw)["choices"]
    assert choice["message"] == {"role": "assistant", "content": "echo: a "}
    assert choice["finish_reason"] == "stop"
    _, raw = await post(http, url, {**body, "stream": True})
    lines = openai_lines(raw)
    deltas = [ln["choices"][0]["delta"] for ln in lines[:-1]]
    assert "".join(d.get("content", "") for d in deltas) == "echo: a "
    assert [ln["choices"][0]["finish_reason"] for ln in lines[:-1]][-1] == "stop"


# --- cumulative usage ---------------------------------------------------------------------------


async def test_message_delta_usage_is_cumulative(client: anthropic.AsyncAnthropic) -> None:
    async with client.messages.stream(
        model="m", max_tokens=100, system="be kind", messages=user("count me in")
    ) as stream:
        deltas = [e async for e in stream if e.type == "message_delta"]
    [delta] = deltas
    assert delta.usage.model_dump(exclude_none=True) == {
        "input_tokens": 5,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": 4,
    }


# --- count_tokens -------------------------------------------------------------------------------


TOOLS = [
    {"name": "get_weather", "description": "Weather for a city", "input_schema": {}},
    {"name": "ping", "input_schema": {"type": "object"}},
]


@pytest.mark.parametrize("query", ["", "?beta=true"])
async def test_count_tokens_counts_like_the_answer(
    http: ClientSession, base_url: str, query: str
) -> None:
    body: Json = {
        "model": "m",
        "system": [{"type": "text", "text": "two words"}],
        "tools": TOOLS,
        "messages": [
            {"role": "user", "content": "three words here"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": [{"type": "text", "text": "again [[fake:tool=t]]"}]},
        ],
    }
    status, raw = await post(http, f"{base_url}/v1/messages/count_tokens{query}", body)
    assert status == 200
    # 2 system + 3 + 1 + 2 message words + tools: 1 + 4 (name, description) + 1
    assert orjson.loads(raw) == {"input_tokens": 14}
    status, raw = await post(http, f"{base_url}/v1/messages", {**body, "max_tokens": 50})
    assert orjson.loads(raw)["usage"]["input_tokens"] == 14
    count, message = await _calls(http, base_url)
    assert (count["path"], count["query"], count["status"]) == (
        "/v1/messages/count_tokens",
        query.removeprefix("?"),
        200,
    )
    assert count["id"] == count["request_id"] and count["model"] == "m"
    assert orjson.loads(base64.b64decode(count["body_b64"])) == body
    assert message["path"] == "/v1/messages"


async def _calls(http: ClientSession, base_url: str) -> list[Json]:
    async with http.get(f"{base_url}/_fake/calls") as resp:
        result: list[Json] = await resp.json()
        return result


async def test_count_tokens_through_the_sdk(client: anthropic.AsyncAnthropic) -> None:
    counted = await client.messages.count_tokens(model="m", messages=user("one two three"))
    assert counted.input_tokens == 3
    beta = await client.beta.messages.count_tokens(
        model="m", messages=[{"role": "user", "content": "one two"}]
    )
    assert beta.input_tokens == 2


@pytest.mark.parametrize(
    "body",
    [
        [1, 2],
        {"messages": user("x")},
        {"model": "m"},
        {"model": "m", "messages": []},
        {"model": "m", "messages": user("[[fake:nope]]")},
    ],
)
async def test_count_tokens_validates(http: ClientSession, base_url: str, body: Any) -> None:
    status, raw = await post(http, f"{base_url}/v1/messages/count_tokens", body)
    assert status == 400
    error = orjson.loads(raw)
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert error["request_id"].startswith("req_fake_")


async def test_count_tokens_takes_no_max_tokens_and_obeys_failure_directives(
    http: ClientSession, base_url: str
) -> None:
    url = f"{base_url}/v1/messages/count_tokens"
    # Directives that shape an answer are read but have nothing to act on here.
    status, raw = await post(http, url, {"model": "m", "messages": user("[[fake:drop_after=1]]")})
    assert (status, orjson.loads(raw)) == (200, {"input_tokens": 1})
    status, raw = await post(http, url, {"model": "m", "messages": user("x [[fake:status=529]]")})
    assert status == 529 and orjson.loads(raw)["error"]["type"] == "overloaded_error"


async def test_max_tokens_zero_generates_nothing(client: anthropic.AsyncAnthropic) -> None:
    """Anthropic takes max_tokens 0 (it warms the prompt cache): an answer with no content."""
    message = await client.messages.create(model="claude-test", max_tokens=0,
                                           messages=[{"role": "user", "content": "hi there"}])
    assert (message.content, message.stop_reason, message.usage.output_tokens) == (
        [], "max_tokens", 0)
