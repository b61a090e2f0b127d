"""The strict request models used where Ferry must understand a request: the translation to
OpenAI-compatible providers (the front door checks only an outline, see test_validation.py).
What they accept, and the exact message a client gets for each fault: messages are asserted
word for word, they are part of the API a client reads."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from shared.wire import ErrorEnvelope, MessagesRequest, describe_validation_error, parse_request

Json = dict[str, Any]

_OMIT = object()
B64_PNG = {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Current weather for a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}


def req(**fields: Any) -> Json:
    """A valid minimal request with `fields` replaced; `_OMIT` removes a field."""
    body: Json = {
        "model": "claude-test",
        "max_tokens": 2048,
        "messages": [{"role": "user", "content": "Hello"}],
    }
    body.update(fields)
    return {k: v for k, v in body.items() if v is not _OMIT}


def user(*blocks: Any) -> list[Json]:
    return [{"role": "user", "content": list(blocks)}]


def assistant(*blocks: Any) -> list[Json]:
    return [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": list(blocks)},
    ]


# --- accepted -------------------------------------------------------------------------------

GOOD: list[Any] = [
    pytest.param(req(), id="minimal"),
    pytest.param(req(messages=[
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "How are you?"},
    ]), id="conversation"),
    pytest.param(req(messages=user(
        {"type": "text", "text": "Hi", "cache_control": {"type": "ephemeral"}},
        {"type": "text", "text": "again", "cache_control": {"type": "ephemeral", "ttl": "1h"}},
    )), id="text_with_cache_control"),
    pytest.param(req(messages=user(
        {"type": "image", "source": B64_PNG}, {"type": "text", "text": "What is this?"},
    )), id="image_base64"),
    pytest.param(req(messages=user(
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
    )), id="image_url"),
    pytest.param(req(messages=user({
        "type": "document",
        "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0xLjQ="},
        "title": "Report", "citations": {"enabled": True},
    })), id="document_pdf"),
    pytest.param(req(messages=user({
        "type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "x"},
    })), id="document_text"),
    pytest.param(req(messages=assistant(
        {"type": "text", "text": "Let me look."},
        {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {"city": "Oslo"}},
    )), id="tool_use"),
    pytest.param(req(messages=user(
        {"type": "tool_result", "tool_use_id": "toolu_01", "content": "12°C"},
    )), id="tool_result_string"),
    pytest.param(req(messages=user({
        "type": "tool_result", "tool_use_id": "toolu_01",
        "content": [{"type": "text", "text": "12°C"}, {"type": "image", "source": B64_PNG}],
    })), id="tool_result_blocks"),
    pytest.param(req(messages=user({
        "type": "tool_result", "tool_use_id": "toolu_01", "content": "no such city",
        "is_error": True,
    })), id="tool_result_is_error"),
    pytest.param(req(messages=assistant(
        {"type": "thinking", "thinking": "Let me think.", "signature": "sig=="},
        {"type": "text", "text": "Done."},
    )), id="thinking_block"),
    pytest.param(req(messages=assistant(
        {"type": "redacted_thinking", "data": "opaque=="},
    )), id="redacted_thinking_block"),
    pytest.param(req(system="Answer briefly."), id="system_string"),
    pytest.param(req(system=[
        {"type": "text", "text": "Answer briefly."},
        {"type": "text", "text": "Long context", "cache_control": {"type": "ephemeral"}},
    ]), id="system_blocks"),
    pytest.param(req(tools=[WEATHER_TOOL, {"type": "custom", **WEATHER_TOOL, "name": "w2"}]),
                 id="tools_custom"),
    pytest.param(req(tools=[
        {"type": "web_search_20250305", "name": "web_search", "max_uses": 3},
        {"type": "bash_20250124", "name": "bash"},
    ]), id="tools_server"),
    pytest.param(req(tools=[WEATHER_TOOL], tool_choice={"type": "auto"}), id="tool_choice_auto"),
    pytest.param(req(tools=[WEATHER_TOOL],
                     tool_choice={"type": "any", "disable_parallel_tool_use": True}),
                 id="tool_choice_any"),
    pytest.param(req(tools=[WEATHER_TOOL], tool_choice={"type": "none"}), id="tool_choice_none"),
    pytest.param(req(tools=[WEATHER_TOOL], tool_choice={"type": "tool", "name": "get_weather"}),
                 id="tool_choice_tool"),
    pytest.param(req(max_tokens=1025, thinking={"type": "enabled", "budget_tokens": 1024}),
                 id="thinking_enabled_min_budget"),
    pytest.param(req(thinking={"type": "disabled"}), id="thinking_disabled"),
    pytest.param(req(thinking={"type": "adaptive", "display": "omitted"}), id="thinking_adaptive"),
    pytest.param(req(max_tokens=0), id="max_tokens_zero"),
    pytest.param(req(messages=[{"role": "user", "content": "Hi"},
                               {"role": "system", "content": "Be brief."}]),
                 id="role_system_mid_conversation"),
    pytest.param(req(metadata={"user_id": "user-42"}), id="metadata"),
    pytest.param(req(stop_sequences=["END", "\n\nHuman:"]), id="stop_sequences"),
    pytest.param(req(stop_sequences=[]), id="stop_sequences_empty"),
    pytest.param(req(temperature=0, top_p=0, top_k=0), id="sampling_zero"),
    pytest.param(req(temperature=1, top_p=1, top_k=1), id="sampling_one"),
    pytest.param(req(temperature=0.7, top_p=0.95, top_k=40), id="sampling_typical"),
    pytest.param(req(stream=True), id="stream_true"),
    pytest.param(req(max_tokens=1), id="max_tokens_one"),
    pytest.param(req(system=None, temperature=None), id="explicit_nulls"),
]


@pytest.mark.parametrize("body", GOOD)
def test_good_request_is_accepted_and_forwarded_unchanged(body: Json) -> None:
    parsed = parse_request(orjson.dumps(body))
    assert parsed.model == body["model"]
    # What goes upstream is what the client sent: nothing dropped, nothing defaulted in.
    assert orjson.loads(parsed.to_json()) == body


def test_unknown_top_level_fields_are_kept() -> None:
    body = req(service_tier="auto", container="container_01",
               mcp_servers=[{"type": "url", "url": "https://mcp.example", "name": "x"}])
    parsed = parse_request(orjson.dumps(body))
    out = orjson.loads(parsed.to_json())
    assert out["service_tier"] == "auto"
    assert out["container"] == "container_01"
    assert out["mcp_servers"] == body["mcp_servers"]


def test_unknown_block_type_is_kept() -> None:
    block = {"type": "search_result", "source": "https://example.com", "title": "t",
             "content": [{"type": "text", "text": "found"}], "future_field": {"a": 1}}
    parsed = parse_request(orjson.dumps(req(messages=user(block))))
    assert orjson.loads(parsed.to_json())["messages"][0]["content"] == [block]


def test_server_tool_extra_fields_are_kept() -> None:
    tool = {"type": "web_search_20250305", "name": "web_search", "allowed_domains": ["a.com"]}
    parsed = parse_request(orjson.dumps(req(tools=[tool])))
    assert orjson.loads(parsed.to_json())["tools"] == [tool]


# --- rejected, with the exact message the client reads -----------------------------------------

BAD: list[Any] = [
    # body shape
    pytest.param(b'{"model": "m",',
                 "request body is not valid JSON: EOF while parsing a value at line 1 column 14",
                 id="invalid_json"),
    pytest.param(b'{"model": "m"} x',
                 "request body is not valid JSON: trailing characters at line 1 column 16",
                 id="trailing_garbage"),
    pytest.param(b"[1, 2]", "request body must be a JSON object (a Messages request)",
                 id="json_array"),
    pytest.param(b"{}",
                 "model: Field required; max_tokens: Field required; messages: Field required",
                 id="empty_object"),
    # required fields
    pytest.param(req(model=_OMIT), "model: Field required", id="missing_model"),
    pytest.param(req(model=""), "model: String should have at least 1 character", id="empty_model"),
    pytest.param(req(max_tokens=_OMIT), "max_tokens: Field required", id="missing_max_tokens"),
    pytest.param(req(messages=_OMIT), "messages: Field required", id="missing_messages"),
    pytest.param(req(messages=[]),
                 "messages: List should have at least 1 item after validation, not 0",
                 id="empty_messages"),
    pytest.param(req(messages="Hello"), "messages: Input should be a valid array",
                 id="messages_string"),
    # max_tokens
    pytest.param(req(max_tokens=-1), "max_tokens: Input should be greater than or equal to 0",
                 id="max_tokens_negative"),
    pytest.param(req(max_tokens="5"), "max_tokens: Input should be a valid integer",
                 id="max_tokens_string"),
    pytest.param(req(max_tokens=True), "max_tokens: Input should be a valid integer",
                 id="max_tokens_bool"),
    pytest.param(req(max_tokens=1.5), "max_tokens: Input should be a valid integer",
                 id="max_tokens_float"),
    # messages and content
    pytest.param(req(messages=[{"role": "tool", "content": "Hi"}]),
                 "messages.0.role: Input should be 'user', 'assistant' or 'system'",
                 id="role_unknown"),
    pytest.param(req(messages=[{"content": "Hi"}]), "messages.0.role: Field required",
                 id="role_missing"),
    pytest.param(req(messages=["Hi"]), "messages.0: Input should be an object",
                 id="message_not_object"),
    pytest.param(req(messages=[{"role": "user", "content": 5}]),
                 "messages.0.content: Input should be a valid string, or "
                 "Input should be a valid array", id="content_number"),
    pytest.param(req(messages=[{"role": "user", "content": {"type": "text", "text": "Hi"}}]),
                 "messages.0.content: Input should be a valid string, or "
                 "Input should be a valid array", id="content_single_block_not_list"),
    pytest.param(req(messages=user({"text": "Hi"})), "messages.0.content.0.type: Field required",
                 id="block_without_type"),
    pytest.param(req(messages=user({"type": "text"})),
                 "messages.0.content.0.text: Field required", id="text_block_missing_text"),
    pytest.param(req(messages=user({"type": "text", "text": 3})),
                 "messages.0.content.0.text: Input should be a valid string",
                 id="text_block_text_number"),
    pytest.param(req(messages=user({"type": "text", "text": "Hi", "colour": "red"})),
                 "messages.0.content.0.colour: Extra inputs are not permitted",
                 id="text_block_extra_key"),
    pytest.param(req(messages=user({"type": "text", "text": "Hi",
                                     "cache_control": {"type": "ephemeral", "ttl": "2h"}})),
                 "messages.0.content.0.cache_control.ttl: Input should be '5m' or '1h'",
                 id="cache_control_bad_ttl"),
    pytest.param(req(messages=assistant({"type": "thinking", "thinking": "hm"})),
                 "messages.1.content.0.signature: Field required",
                 id="thinking_block_missing_signature"),
    pytest.param(req(messages=user({"type": "image", "source": {
        "type": "base64", "media_type": "image/bmp", "data": "Qk0="}})),
                 "messages.0.content.0.source.media_type: Input should be 'image/jpeg', "
                 "'image/png', 'image/gif' or 'image/webp'", id="image_bad_media_type"),
    pytest.param(req(messages=user({"type": "image", "source": {"type": "ftp", "url": "ftp://x"}})),
                 "messages.0.content.0.source: Input tag 'ftp' found using 'type' does not match "
                 "any of the expected tags: 'base64', 'url', 'file'",
                 id="image_source_type_unknown"),
    pytest.param(req(messages=assistant({"type": "tool_use", "id": "toolu_01", "name": "get",
                                         "input": ["Oslo"]})),
                 "messages.1.content.0.input: Input should be an object",
                 id="tool_use_input_not_object"),
    pytest.param(req(messages=user({"type": "tool_result", "tool_use_id": "toolu_01",
                                    "content": [{"type": "text"}]})),
                 "messages.0.content.0.content.0.text: Field required",
                 id="tool_result_inner_block_bad"),
    pytest.param(req(messages=user({"type": "tool_result", "tool_use_id": "t", "is_error": "yes"})),
                 "messages.0.content.0.is_error: Input should be a valid boolean",
                 id="tool_result_is_error_string"),
    # tools and tool_choice
    pytest.param(req(tools=[{"name": "get_weather"}]), "tools.0.input_schema: Field required",
                 id="tool_without_input_schema"),
    pytest.param(req(tools=[{"name": "get_weather", "input_schema": {"type": "string"}}]),
                 'tools.0.input_schema: must be a JSON Schema with "type": "object"',
                 id="input_schema_not_object_type"),
    pytest.param(req(tools=[{"name": "get_weather", "input_schema": []}]),
                 "tools.0.input_schema: Input should be an object", id="input_schema_list"),
    pytest.param(req(tools=[{"name": "get weather!", "input_schema": {"type": "object"}}]),
                 "tools.0.name: String should match pattern '^[a-zA-Z0-9_-]{1,128}$'",
                 id="bad_tool_name"),
    pytest.param(req(tools=[{**WEATHER_TOOL, "strict_mode": True}]),
                 "tools.0.strict_mode: Extra inputs are not permitted", id="tool_extra_key"),
    pytest.param(req(tools=[{"type": "web_search_20250305"}]), "tools.0.name: Field required",
                 id="server_tool_without_name"),
    pytest.param(req(tool_choice={"type": "required"}),
                 "tool_choice: Input tag 'required' found using 'type' does not match any of the "
                 "expected tags: 'auto', 'any', 'none', 'tool'", id="tool_choice_bad_type"),
    pytest.param(req(tool_choice="auto"), "tool_choice: Input should be an object",
                 id="tool_choice_string"),
    pytest.param(req(tools=[WEATHER_TOOL], tool_choice={"type": "tool"}),
                 "tool_choice.name: Field required", id="tool_choice_tool_without_name"),
    # thinking
    pytest.param(req(max_tokens=4096, thinking={"type": "enabled", "budget_tokens": 1023}),
                 "thinking.budget_tokens: Input should be greater than or equal to 1024",
                 id="thinking_budget_below_1024"),
    pytest.param(req(max_tokens=2048, thinking={"type": "enabled", "budget_tokens": 2048}),
                 "thinking.budget_tokens must be less than max_tokens",
                 id="thinking_budget_equals_max_tokens"),
    pytest.param(req(thinking={"type": "enabled"}), "thinking.budget_tokens: Field required",
                 id="thinking_enabled_without_budget"),
    # sampling
    pytest.param(req(temperature=1.5), "temperature: Input should be less than or equal to 1",
                 id="temperature_above_1"),
    pytest.param(req(temperature=-0.1), "temperature: Input should be greater than or equal to 0",
                 id="temperature_negative"),
    pytest.param(req(temperature="0.5"), "temperature: Input should be a valid number",
                 id="temperature_string"),
    pytest.param(req(top_p=2), "top_p: Input should be less than or equal to 1", id="top_p_2"),
    pytest.param(req(top_k=-1), "top_k: Input should be greater than or equal to 0",
                 id="top_k_negative"),
    # other fields
    pytest.param(req(stop_sequences="END"), "stop_sequences: Input should be a valid array",
                 id="stop_sequences_string"),
    pytest.param(req(stop_sequences=[1, 2]),
                 "stop_sequences.0: Input should be a valid string; "
                 "stop_sequences.1: Input should be a valid string", id="stop_sequences_ints"),
    pytest.param(req(metadata={"user_id": "u", "session": "s"}),
                 "metadata.session: Extra inputs are not permitted", id="metadata_extra_key"),
    pytest.param(req(system=5),
                 "system: Input should be a valid string, or Input should be a valid array",
                 id="system_number"),
    pytest.param(req(system=[{"type": "text"}]), "system.0.text: Field required",
                 id="system_block_missing_text"),
    pytest.param(req(stream="yes"), "stream: Input should be a valid boolean", id="stream_yes"),
    # at most five faults are listed
    pytest.param(req(model=_OMIT, max_tokens=_OMIT, messages=_OMIT, temperature=3, top_p=3,
                     top_k=-1),
                 "model: Field required; max_tokens: Field required; messages: Field required; "
                 "temperature: Input should be less than or equal to 1; "
                 "top_p: Input should be less than or equal to 1; (and 1 more)",
                 id="many_faults_truncated"),
]


@pytest.mark.parametrize(("body", "message"), BAD)
def test_bad_request_is_rejected_with_exact_message(body: Json | bytes, message: str) -> None:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    with pytest.raises(ValidationError) as info:
        parse_request(raw)
    assert describe_validation_error(info.value, raw) == message


def test_message_without_body_still_names_the_field() -> None:
    """Callers that cannot pass the body get paths with union tags left in, never a crash."""
    raw = orjson.dumps(req(max_tokens=-1))
    with pytest.raises(ValidationError) as info:
        parse_request(raw)
    assert describe_validation_error(info.value) == (
        "max_tokens: Input should be greater than or equal to 0"
    )


def test_request_model_is_the_parse_result() -> None:
    assert isinstance(parse_request(orjson.dumps(req())), MessagesRequest)


@pytest.mark.parametrize("message", [
    "plain", 'quotes " and \\ backslashes', "control \n\t\r\x00\x1f\x7f", "unicode é 漢字 🙂",
    "a client's bytes \udcff\udc80 read with surrogate escapes", "</script> & / <",
    "\u2028\u2029 line separators", "",
])
@pytest.mark.parametrize("request_id", [None, "req_0123"])
def test_error_bytes_are_the_envelope_models_bytes(message: str, request_id: str | None) -> None:
    """The api writes errors with ErrorEnvelope.dump (no models built): the same bytes as the
    models give, whatever the message holds."""
    assert ErrorEnvelope.dump("overloaded_error", message, request_id) == \
        ErrorEnvelope.of("overloaded_error", message, request_id).to_json()
