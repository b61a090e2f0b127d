"""The front door's checks: only a request's outline (what Ferry needs to route and queue it);
everything else, at any depth, is the provider's to judge. Messages are asserted word for
word: they are part of the API a client reads."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from typing import Any

import orjson
import pytest

from api import validation
from api.headers import forwarded_headers, idempotency_key, parse_async_flag, parse_ttl
from api.validation import MAX_MODEL_BYTES, BodyChecker, RequestFacts, inspect_body
from shared.errors import InvalidRequest
from shared.settings import Settings

Json = dict[str, Any]
_OMIT = object()


def req(**fields: Any) -> Json:
    body: Json = {"model": "claude-test", "max_tokens": 2048,
                  "messages": [{"role": "user", "content": "Hello"}]}
    body.update(fields)
    return {k: v for k, v in body.items() if v is not _OMIT}


def user(*blocks: Any) -> list[Json]:
    return [{"role": "user", "content": list(blocks)}]


# Shapes a strict schema refused (they are today's Anthropic API, or tomorrow's): accepted.
ACCEPTED: list[Any] = [
    pytest.param(req(), id="minimal"),
    pytest.param(req(max_tokens=0), id="max_tokens_zero_warms_the_cache"),
    pytest.param(req(messages=[{"role": "user", "content": "Hi"},
                               {"role": "system", "content": "Be brief."}]), id="role_system"),
    pytest.param(req(messages=[{"role": "narrator", "content": "Hi"}]), id="future_role"),
    pytest.param(req(thinking={"type": "adaptive", "display": "summarized"}),
                 id="thinking_adaptive"),
    pytest.param(req(tools=[{"name": "t", "input_schema": {"type": "object"}, "strict": True,
                             "defer_loading": True, "input_examples": [{"a": 1}],
                             "allowed_callers": ["code_execution"],
                             "eager_input_streaming": True}]), id="new_tool_fields"),
    pytest.param(req(tools=[{"type": "mcp_toolset", "mcp_server_name": "x"}]),
                 id="mcp_toolset_without_name"),
    pytest.param(req(messages=user({"type": "tool_result", "tool_use_id": "t",
                                    "content": [{"type": "tool_reference", "tool_name": "x"}]},
                                   {"type": "brand_new_block", "anything": [1, {"x": None}]})),
                 id="new_block_types"),
    pytest.param(req(output_config={"effort": "low"}, context_management={"edits": []},
                     container="c", service_tier="auto", cache_control={"type": "ephemeral"},
                     fallbacks=[{"model": "claude-x"}, "default"], inference_geo="eu"),
                 id="new_top_level_fields"),
    pytest.param(req(temperature=7, top_k=-3, stop_sequences="END", system=5),
                 id="values_only_the_provider_judges"),
    pytest.param(req(stream=None), id="stream_null_is_absent"),
    pytest.param(req(messages=[{"role": "user", "content": []}]), id="empty_content_array"),
]


@pytest.mark.parametrize("body", ACCEPTED)
def test_the_outline_is_enough(body: Json) -> None:
    facts = inspect_body(orjson.dumps(body))
    assert facts == RequestFacts(model=body["model"], stream=False)


def test_numbers_beyond_64_bits_are_valid_json() -> None:
    body = b'{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"x"}],' \
           b'"x":1e400,"y":' + b"9" * 4000 + b"}"
    assert inspect_body(body) == RequestFacts("m", False)


def test_stream_and_count_tokens() -> None:
    assert inspect_body(orjson.dumps(req(stream=True))) == RequestFacts("claude-test", True)
    body = orjson.dumps(req(max_tokens=_OMIT, stream=True))
    assert inspect_body(body, count_tokens=True) == RequestFacts("claude-test", False)


REFUSED: list[Any] = [
    pytest.param(b'{"model": "m",', "request body is not valid JSON: unexpected end of data: "
                 "line 1 column 15 (char 14)", id="invalid_json"),
    pytest.param(b"\xff\xfe{}", "request body is not valid UTF-8", id="invalid_utf8"),
    pytest.param(b'{"model":"m","max_tokens":1,"messages":[],"x":NaN}',
                 "request body is not valid JSON: unexpected character, expected a JSON value: "
                 "line 1 column 47 (char 46)", id="nan_is_not_json"),
    pytest.param(b"[" * 5000 + b"]" * 5000, "request body is nested too deeply",
                 id="nested_too_deeply"),
    pytest.param(b"[1, 2]", "request body must be a JSON object (a Messages request)",
                 id="json_array"),
    pytest.param(req(model=_OMIT), "model: Field required", id="missing_model"),
    pytest.param(req(model=""), "model: must not be empty", id="empty_model"),
    pytest.param(req(model=3), "model: must be a string, got a number", id="model_number"),
    pytest.param(req(model="a\u0000"), "model: must not contain a NUL character", id="model_nul"),
    pytest.param(req(model="m" * (MAX_MODEL_BYTES + 1)),
                 f"model: is {MAX_MODEL_BYTES + 1} bytes long; at most {MAX_MODEL_BYTES}",
                 id="model_too_long"),
    pytest.param(req(max_tokens=_OMIT), "max_tokens: Field required", id="missing_max_tokens"),
    pytest.param(req(max_tokens=-1), "max_tokens: must be greater than or equal to 0",
                 id="max_tokens_negative"),
    pytest.param(req(max_tokens="5"), "max_tokens: must be an integer, got a string",
                 id="max_tokens_string"),
    pytest.param(req(max_tokens=True), "max_tokens: must be an integer, got a boolean",
                 id="max_tokens_bool"),
    pytest.param(req(max_tokens=1.5), "max_tokens: must be an integer, got a number",
                 id="max_tokens_float"),
    pytest.param(req(messages=_OMIT), "messages: Field required", id="missing_messages"),
    pytest.param(req(messages=[]), "messages: must contain at least one message",
                 id="empty_messages"),
    pytest.param(req(messages="Hello"), "messages: must be an array, got a string",
                 id="messages_string"),
    pytest.param(req(messages=["Hi"]), "messages.0: must be an object, got a string",
                 id="message_not_object"),
    pytest.param(req(messages=[{"content": "Hi"}]), "messages.0.role: Field required",
                 id="role_missing"),
    pytest.param(req(messages=[{"role": 1, "content": "Hi"}]),
                 "messages.0.role: must be a string, got a number", id="role_number"),
    pytest.param(req(messages=[{"role": "user"}]), "messages.0.content: Field required",
                 id="content_missing"),
    pytest.param(req(messages=[{"role": "user", "content": 5}]),
                 "messages.0.content: must be a string or an array of blocks, got a number",
                 id="content_number"),
    pytest.param(req(messages=[{"role": "user", "content": {"type": "text", "text": "Hi"}}]),
                 "messages.0.content: must be a string or an array of blocks, got an object",
                 id="content_single_block_not_list"),
    pytest.param(req(messages=user("Hi")), "messages.0.content.0: must be an object, got a string",
                 id="block_string"),
    pytest.param(req(messages=user({"text": "Hi"})), "messages.0.content.0.type: Field required",
                 id="block_without_type"),
    pytest.param(req(messages=user({"type": 7})),
                 "messages.0.content.0.type: must be a string, got a number",
                 id="block_type_number"),
    pytest.param(req(stream="yes"), "stream: must be a boolean, got a string", id="stream_yes"),
]


@pytest.mark.parametrize(("body", "message"), REFUSED)
def test_an_outline_fault_is_named(body: Json | bytes, message: str) -> None:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    assert inspect_body(raw) == message


def test_count_tokens_needs_no_max_tokens_but_a_model() -> None:
    assert inspect_body(orjson.dumps(req(model=_OMIT, max_tokens=_OMIT)),
                        count_tokens=True) == "model: Field required"


async def test_a_large_body_is_checked_off_the_event_loop() -> None:
    blocks = [{"type": "text", "text": "x" * 100} for _ in range(20_000)]
    body = orjson.dumps(req(messages=user(*blocks)))
    checker = BodyChecker(offload_bytes=1024)
    async with checker.running():
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        ticker = asyncio.create_task(tick())
        facts = await checker.check(body)
        ticker.cancel()
        bad = await asyncio.gather(checker.check(b"[]"), return_exceptions=True)
    assert facts == RequestFacts("claude-test", False)
    assert ticks > 1  # the loop kept running while the helper process parsed
    assert isinstance(bad[0], InvalidRequest)
    assert bad[0].message == "request body must be a JSON object (a Messages request)"


async def test_a_helper_that_does_not_start_in_time_leaves_the_checks_to_the_api(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(validation, "WARM_UP_TIMEOUT_S", 0.0)  # no process starts in 0 s
    body = orjson.dumps(req(messages=user(*[{"type": "text", "text": "x"}] * 200)))
    checker = BodyChecker(offload_bytes=1024)
    async with checker.running():
        assert checker._pool is None
        assert await checker.check(body) == RequestFacts("claude-test", False)
        with pytest.raises(InvalidRequest):
            await checker.check(b"[" + b" " * 2048 + b"]")


async def test_a_helper_that_dies_leaves_the_checks_to_the_api() -> None:
    body = orjson.dumps(req(messages=user(*[{"type": "text", "text": "x"}] * 200)))
    checker = BodyChecker(offload_bytes=1024)
    async with checker.running():
        pool = checker._pool
        assert pool is not None
        for process in list(pool._processes.values()):  # type: ignore[attr-defined]
            os.kill(process.pid, signal.SIGKILL)
            process.join()
        assert await checker.check(body) == RequestFacts("claude-test", False)
        assert checker._pool is None
        assert await checker.check(body) == RequestFacts("claude-test", False)


# --- headers ---------------------------------------------------------------------------------


def test_forwarded_headers_merge_every_beta_and_skip_credentials() -> None:
    from multidict import CIMultiDict, CIMultiDictProxy

    headers = CIMultiDictProxy(CIMultiDict([
        ("x-api-key", "secret"), ("Authorization", "Bearer secret"),
        ("anthropic-version", "2023-06-01"), ("anthropic-beta", "a,b"),
        ("Anthropic-Beta", " b , c"), ("anthropic-beta", "a"),
        ("anthropic-workspace-id", "ws_1"), ("x-app", "cli"),
    ]))
    assert forwarded_headers(headers) == (
        ("anthropic-version", "2023-06-01"), ("anthropic-beta", "a,b,c"),
        ("anthropic-workspace-id", "ws_1"))


def test_forwarded_headers_are_bounded_and_ascii() -> None:
    from multidict import CIMultiDict, CIMultiDictProxy

    with pytest.raises(InvalidRequest, match="anthropic-beta: must be ASCII"):
        forwarded_headers(CIMultiDictProxy(CIMultiDict([("anthropic-beta", "\udcff")])))
    many = CIMultiDictProxy(CIMultiDict([("anthropic-beta", f"beta-{i}-" + "x" * 100)
                                         for i in range(200)]))
    with pytest.raises(InvalidRequest, match="at most 16384"):
        forwarded_headers(many)


@pytest.mark.parametrize(("value", "expected"), [
    ("true", True), ("1", True), ("TRUE", True), (" true ", True),
    ("false", False), ("0", False), ("", False), (None, False),
])
def test_async_flag(value: str | None, expected: bool) -> None:
    assert parse_async_flag(value) is expected


@pytest.mark.parametrize("value", ["yes", "on", "2", "truth"])
def test_async_flag_rejects_other_values(value: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_async_flag(value)
    assert info.value.message == f"x-bf-async must be 'true' or 'false', got {value!r}"
    assert info.value.status == 400


TTL_SETTINGS = Settings(result_ttl_default_s=3600, result_ttl_max_s=86400)


@pytest.mark.parametrize(("value", "expected"), [
    (None, 3600), ("0", 0), ("60", 60), (" 60 ", 60), ("86400", 86400),
])
def test_ttl(value: str | None, expected: int) -> None:
    assert parse_ttl(value, TTL_SETTINGS) == expected


@pytest.mark.parametrize(("value", "message"), [
    ("86401", "x-bf-async-job-result-ttl must be between 0 and 86400 seconds, got 86401"),
    ("-1", "x-bf-async-job-result-ttl must be between 0 and 86400 seconds, got -1"),
    ("1.5", "x-bf-async-job-result-ttl must be a whole number of seconds, got '1.5'"),
    ("abc", "x-bf-async-job-result-ttl must be a whole number of seconds, got 'abc'"),
    ("", "x-bf-async-job-result-ttl must be a whole number of seconds, got ''"),
])
def test_ttl_rejects(value: str, message: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_ttl(value, TTL_SETTINGS)
    assert info.value.message == message
    assert info.value.status == 400


def test_ttl_default_follows_settings() -> None:
    settings = Settings(result_ttl_default_s=120, result_ttl_max_s=600)
    assert parse_ttl(None, settings) == 120
    with pytest.raises(InvalidRequest):
        parse_ttl("601", settings)


@pytest.mark.parametrize(("value", "expected"), [
    (None, None), ("abc-123", "abc-123"), ("  k  ", "k"),
])
def test_idempotency_key(value: str | None, expected: str | None) -> None:
    assert idempotency_key({} if value is None else {"idempotency-key": value}) == expected


@pytest.mark.parametrize("value", ["", "x" * 256, "caf\u00e9", "a\u0000b"])
def test_idempotency_key_rejects(value: str) -> None:
    with pytest.raises(InvalidRequest, match="Idempotency-Key must be 1 to 255 printable"):
        idempotency_key({"idempotency-key": value})


def test_standard_json_agrees_on_what_is_valid() -> None:
    """The fallback parser must not accept what standard JSON refuses."""
    for text in (b'{"a": Infinity}', b'{"a": -Infinity}'):
        with pytest.raises(ValueError):
            json.loads(text, parse_constant=lambda name: (_ for _ in ()).throw(ValueError(name)))
        assert isinstance(inspect_body(text), str)
