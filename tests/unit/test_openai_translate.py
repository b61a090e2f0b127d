"""Anthropic ⇄ OpenAI translation tables: requests, rejections, answers, finish reasons, errors."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from shared.wire import MessagesRequest
from worker.providers.base import ProviderError
from worker.providers.openai_translate import (
    TranslationError,
    map_finish_reason,
    map_openai_error,
    parse_completion,
    translate_request,
    translate_response,
)

Json = dict[str, Any]
UP = "gpt-up"
CANNOT = "cannot be sent to an OpenAI-compatible provider"
PNG = {"type": "base64", "media_type": "image/png", "data": "iVBORw0K"}
EPHEMERAL = {"type": "ephemeral"}


def req(**fields: Any) -> MessagesRequest:
    body = {"model": "claude-x", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
    return MessagesRequest.model_validate({**body, **fields})


def user(*content: Any) -> Json:
    return {"role": "user", "content": list(content)}


def assistant(*content: Any) -> Json:
    return {"role": "assistant", "content": list(content)}


def text(value: str, **extra: Any) -> Json:
    return {"type": "text", "text": value, **extra}


def tool_result(tool_use_id: str, content: Any = None, **extra: Any) -> Json:
    block = {"type": "tool_result", "tool_use_id": tool_use_id, **extra}
    return block if content is None else {**block, "content": content}


def out(*messages: Json, **fields: Any) -> Json:
    return {"model": UP, "max_tokens": 10, "messages": list(messages), **fields}


HI = {"role": "user", "content": "hi"}
TOOL = {"name": "get", "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}}}
FN = {"name": "get", "parameters": TOOL["input_schema"]}

REQUEST_CASES: list[tuple[str, Json, Json]] = [
    ("string content as is", {}, out(HI)),
    ("system string first", {"system": "be brief"},
     out({"role": "system", "content": "be brief"}, HI)),
    ("system blocks joined, cache_control dropped",
     {"system": [text("a", cache_control=EPHEMERAL), text("b")]},
     out({"role": "system", "content": "a\n\nb"}, HI)),
    ("empty system omitted", {"system": ""}, out(HI)),
    ("one text block collapses; citations and cache_control dropped",
     {"messages": [user(text("hi", cache_control=EPHEMERAL, citations=[]))]}, out(HI)),
    ("text and images become parts",
     {"messages": [user(text("look"), {"type": "image", "source": PNG},
                        {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}})]},
     out({"role": "user", "content": [
         {"type": "text", "text": "look"},
         {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0K"}},
         {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
     ]})),
    ("assistant text and tool_use",
     {"messages": [HI, assistant(text("calling"), {"type": "tool_use", "id": "call_1",
                                                  "name": "get", "input": {"q": "x", "n": 1}})]},
     out(HI, {"role": "assistant", "content": "calling", "tool_calls": [
         {"id": "call_1", "type": "function",
          "function": {"name": "get", "arguments": '{"q": "x", "n": 1}'}}]})),
    ("assistant tool_use only: null content; thinking dropped",
     {"messages": [HI, assistant({"type": "thinking", "thinking": "hm", "signature": "s"},
                                 {"type": "tool_use", "id": "c", "name": "get", "input": {}})]},
     out(HI, {"role": "assistant", "content": None, "tool_calls": [
         {"id": "c", "type": "function", "function": {"name": "get", "arguments": "{}"}}]})),
    ("assistant turn of thinking only is dropped",
     {"messages": [HI, assistant({"type": "redacted_thinking", "data": "zz"}), HI]},
     out(HI, HI)),
    ("assistant text blocks become parts",
     {"messages": [HI, assistant(text("a"), text("b"))]},
     out(HI, {"role": "assistant", "content": [{"type": "text", "text": "a"},
                                               {"type": "text", "text": "b"}]})),
    ("tool results first, then the rest of the turn",
     {"messages": [user(text("here"), tool_result("c1", "42"),
                        tool_result("c2", [text("a"), text("b")], is_error=True),
                        tool_result("c3"))]},
     out({"role": "tool", "tool_call_id": "c1", "content": "42"},
         {"role": "tool", "tool_call_id": "c2", "content": "Error: a\n\nb"},
         {"role": "tool", "tool_call_id": "c3", "content": ""},
         {"role": "user", "content": "here"})),
    ("tool results before content parts",
     {"messages": [user(text("see"), {"type": "image", "source": PNG}, tool_result("c1", "r"))]},
     out({"role": "tool", "tool_call_id": "c1", "content": "r"},
         {"role": "user", "content": [
             {"type": "text", "text": "see"},
             {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0K"}}]})),
    ("a turn of tool results only has no user message",
     {"messages": [user(tool_result("c1", "ok", is_error=False))]},
     out({"role": "tool", "tool_call_id": "c1", "content": "ok"})),
    ("tools; description only when given",
     {"tools": [{**TOOL, "description": "fetch", "cache_control": EPHEMERAL},
                {**TOOL, "type": "custom", "name": "put"}]},
     out(HI, tools=[{"type": "function", "function": {**FN, "description": "fetch"}},
                    {"type": "function", "function": {**FN, "name": "put"}}])),
    ("tool_choice auto", {"tool_choice": {"type": "auto"}}, out(HI, tool_choice="auto")),
    ("tool_choice any", {"tool_choice": {"type": "any"}}, out(HI, tool_choice="required")),
    ("tool_choice none", {"tool_choice": {"type": "none"}}, out(HI, tool_choice="none")),
    ("tool_choice tool, no parallel calls",
     {"tool_choice": {"type": "tool", "name": "get", "disable_parallel_tool_use": True}},
     out(HI, tool_choice={"type": "function", "function": {"name": "get"}},
         parallel_tool_calls=False)),
    ("parallel calls allowed: field omitted",
     {"tool_choice": {"type": "any", "disable_parallel_tool_use": False}},
     out(HI, tool_choice="required")),
    ("sampling fields; top_k, disabled thinking and extras dropped",
     {"temperature": 0.5, "top_p": 0.9, "top_k": 5, "stop_sequences": ["END", "##"],
      "metadata": {"user_id": "u-1"}, "thinking": {"type": "disabled"},
      "service_tier": "auto", "container": "c"},
     out(HI, temperature=0.5, top_p=0.9, stop=["END", "##"], user="u-1")),
    ("metadata without user_id, empty stop list",
     {"metadata": {}, "stop_sequences": []}, out(HI)),
    ("stream asks for usage", {"stream": True},
     out(HI, stream=True, stream_options={"include_usage": True})),
    ("stream false omitted", {"stream": False}, out(HI)),
]


@pytest.mark.parametrize(("fields", "expected"), [c[1:] for c in REQUEST_CASES],
                         ids=[c[0] for c in REQUEST_CASES])
def test_request(fields: Json, expected: Json) -> None:
    assert translate_request(req(**fields), UP) == expected


@pytest.mark.parametrize(("fields", "stream", "streams"), [
    ({"stream": True}, False, False),
    ({}, True, True),
    ({"stream": False}, None, False),
])
def test_stream_override(fields: Json, stream: bool | None, streams: bool) -> None:
    translated = translate_request(req(**fields), UP, stream=stream)
    assert ("stream" in translated, "stream_options" in translated) == (streams, streams)


DOC = {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "d"}}
TOOL_USE = {"type": "tool_use", "id": "c", "name": "get", "input": {}}

REJECTIONS: list[tuple[Json, str]] = [
    ({"messages": [user(text("a"), DOC)]},
     f"messages.0.content.1: document blocks {CANNOT}"),
    ({"messages": [HI, assistant({"type": "server_tool_use", "id": "s", "name": "web_search",
                                  "input": {}})]},
     f"messages.1.content.0: server_tool_use blocks {CANNOT}"),
    ({"messages": [user(tool_result("c", [text("a"), {"type": "image", "source": PNG}]))]},
     f"messages.0.content.0.content.1: image blocks inside a tool_result {CANNOT}"),
    ({"messages": [user(tool_result("c", [DOC]))]},
     f"messages.0.content.0.content.0: document blocks inside a tool_result {CANNOT}"),
    ({"messages": [user({"type": "image", "source": {"type": "file", "file_id": "f"}})]},
     f"messages.0.content.0.source: images with a file source {CANNOT}"),
    ({"tools": [TOOL, {"type": "web_search_20250305", "name": "web_search"}]},
     f"tools.1: server tool 'web_search_20250305' {CANNOT}"),
    ({"thinking": {"type": "enabled", "budget_tokens": 1024}, "max_tokens": 2000},
     f"thinking: extended thinking {CANNOT}"),
    ({"messages": [user(TOOL_USE)]},
     "messages.0.content.0: tool_use blocks are only allowed in assistant turns"),
    ({"messages": [user({"type": "thinking", "thinking": "t", "signature": "s"})]},
     "messages.0.content.0: thinking blocks are only allowed in assistant turns"),
    ({"messages": [HI, assistant(text("a"), tool_result("c", "x"))]},
     "messages.1.content.1: tool_result blocks are only allowed in user turns"),
    ({"messages": [HI, assistant({"type": "image", "source": PNG})]},
     "messages.1.content.0: image blocks are only allowed in user turns"),
]


@pytest.mark.parametrize(("fields", "message"), REJECTIONS)
def test_rejection(fields: Json, message: str) -> None:
    with pytest.raises(TranslationError) as caught:
        translate_request(req(**fields), UP)
    error = caught.value
    assert isinstance(error, ProviderError)
    assert (error.status, error.error_type) == (400, "invalid_request_error")
    assert error.message == message
    assert error.retryable is False


# --- responses --------------------------------------------------------------------------------


def completion(message: Json, finish: str | None = "stop", **choice: Any) -> Json:
    return {
        "id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-up",
        "choices": [{"index": 0, "message": {"role": "assistant", **message},
                     "finish_reason": finish, **choice}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
    }


def message(content: list[Json], stop_reason: str, stop_sequence: str | None = None) -> Json:
    return {
        "id": "msg_chatcmpl-1", "type": "message", "role": "assistant", "model": "claude-x",
        "content": content, "stop_reason": stop_reason, "stop_sequence": stop_sequence,
        "usage": {"input_tokens": 7, "output_tokens": 3,
                  "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0},
    }


def call(call_id: str, name: str, arguments: Any) -> Json:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def tool_use(call_id: str, name: str, value: Json) -> Json:
    return {"type": "tool_use", "id": call_id, "name": name, "input": value}


RESPONSE_CASES: list[tuple[str, Json, Json]] = [
    ("text", completion({"content": "Hi"}), message([text("Hi")], "end_turn")),
    ("empty text is no block", completion({"content": ""}), message([], "end_turn")),
    ("text then tool calls",
     completion({"content": "Let me see", "tool_calls": [
         call("call_a", "get", '{"q":"x"}'), call("call_b", "put", "")]}, "tool_calls"),
     message([text("Let me see"), tool_use("call_a", "get", {"q": "x"}),
              tool_use("call_b", "put", {})], "tool_use")),
    ("null content, one call", completion({"content": None, "tool_calls": [
        call("call_a", "get", '{"n": 1}')]}, "tool_calls"),
     message([tool_use("call_a", "get", {"n": 1})], "tool_use")),
    ("tool calls with finish stop are tool_use",
     completion({"content": None, "tool_calls": [call("c", "get", "{}")]}, "stop"),
     message([tool_use("c", "get", {})], "tool_use")),
    ("length", completion({"content": "cut"}, "length"), message([text("cut")], "max_tokens")),
    ("content_filter", completion({"content": None}, "content_filter"), message([], "refusal")),
    ("refusal text", completion({"content": None, "refusal": "I can't."}),
     message([text("I can't.")], "refusal")),
    ("content parts", completion({"content": [text("a"), text("b")]}),
     message([text("ab")], "end_turn")),
    ("matched stop sequence reported (vLLM)",
     completion({"content": "x"}, "stop", stop_reason="END"),
     message([text("x")], "stop_sequence", "END")),
    ("unknown stop string is end_turn",
     completion({"content": "x"}, "stop", stop_reason="OTHER"), message([text("x")], "end_turn")),
    ("deprecated function_call",
     completion({"content": None, "function_call": {"name": "get", "arguments": "{}"}},
                "function_call"),
     message([tool_use("ID", "get", {})], "tool_use")),
]


@pytest.mark.parametrize(("answer", "expected"), [c[1:] for c in RESPONSE_CASES],
                         ids=[c[0] for c in RESPONSE_CASES])
def test_response(answer: Json, expected: Json) -> None:
    result = translate_response(answer, "claude-x", ["END"])
    for block in result["content"]:
        if block["type"] == "tool_use" and block["id"].startswith("toolu_"):
            assert len(block["id"]) == 30
            block["id"] = "ID"  # OpenAI sent none: a fresh one
    assert result == expected


def test_response_without_id_or_usage() -> None:
    answer = completion({"content": "x"})
    del answer["id"], answer["usage"]
    result = translate_response(answer, "m")
    assert result["id"].startswith("msg_") and len(result["id"]) == 28
    assert result["usage"] == {"input_tokens": 0, "output_tokens": 0,
                               "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}


@pytest.mark.parametrize(("answer", "text_"), [
    (completion({"tool_calls": [call("c", "get", '{"q": ')]}, "tool_calls"),
     "provider returned invalid tool arguments"),
    (completion({"tool_calls": [call("c", "get", "[1, 2]")]}, "tool_calls"),
     "provider returned invalid tool arguments"),
    (completion({"tool_calls": [{"id": "c", "function": {"arguments": "{}"}}]}),
     "provider returned a tool call without a function name"),
    ({"id": "x", "choices": []}, "the provider's answer has no choices"),
    ({"id": "x"}, "the provider's answer has no choices"),
])
def test_bad_answer(answer: Json, text_: str) -> None:
    with pytest.raises(ProviderError) as caught:
        translate_response(answer, "m")
    assert (caught.value.status, caught.value.error_type, caught.value.message) == (
        502, "api_error", text_)


def test_parse_completion() -> None:
    answer = completion({"content": "Hi"}, "length")
    response = parse_completion(orjson.dumps(answer), "claude-x")
    assert orjson.loads(response.body) == message([text("Hi")], "max_tokens")
    assert response.stop_reason == "max_tokens"
    assert response.usage == message([], "")["usage"]
    with pytest.raises(ProviderError) as caught:
        parse_completion(b"<html>", "m")
    assert (caught.value.status, caught.value.retryable) == (502, True)


@pytest.mark.parametrize(("finish", "matched", "tools", "expected"), [
    ("stop", None, False, ("end_turn", None)),
    ("length", None, False, ("max_tokens", None)),
    ("tool_calls", None, True, ("tool_use", None)),
    ("function_call", None, True, ("tool_use", None)),
    ("content_filter", None, False, ("refusal", None)),
    (None, None, False, ("end_turn", None)),
    ("abort", None, False, ("end_turn", None)),
    ("stop", None, True, ("tool_use", None)),
    ("stop", "##", False, ("stop_sequence", "##")),
    ("stop", 50256, False, ("end_turn", None)),  # vLLM reports a stop token id as an int
    ("length", "##", False, ("max_tokens", None)),
])
def test_finish_reason(finish: str | None, matched: Any, tools: bool,
                       expected: tuple[str, str | None]) -> None:
    assert map_finish_reason(finish, matched, ["##"], tools) == expected


# --- errors -----------------------------------------------------------------------------------


def openai_error(msg: str) -> bytes:
    return orjson.dumps({"error": {"message": msg, "type": "x", "param": None, "code": None}})


@pytest.mark.parametrize(("status", "body", "retry_after", "expected"), [
    (400, openai_error("bad"), None, ("invalid_request_error", "bad", False, None)),
    (401, openai_error("key"), None, ("authentication_error", "key", False, None)),
    (403, openai_error("no"), None, ("permission_error", "no", False, None)),
    (404, openai_error("model"), None, ("not_found_error", "model", False, None)),
    (413, openai_error("big"), None, ("request_too_large", "big", False, None)),
    (422, openai_error("x"), None, ("invalid_request_error", "x", False, None)),
    (429, openai_error("slow"), "2", ("rate_limit_error", "slow", True, 2.0)),
    (429, openai_error("slow"), "Wed, 21 Oct 2015 07:28:00 GMT",
     ("rate_limit_error", "slow", True, None)),
    (500, openai_error("boom"), None, ("api_error", "boom", True, None)),
    (502, b"", None, ("api_error", "provider answered HTTP 502", True, None)),
    (503, b"<h1>down</h1>", "1.5",
     ("api_error", "provider answered HTTP 503", True, 1.5)),  # the body is not echoed
    (504, openai_error("late"), None, ("api_error", "late", True, None)),
    (529, openai_error("busy"), None, ("overloaded_error", "busy", True, None)),
    (400, b'{"error": "plain string"}', None,
     ("invalid_request_error", "plain string", False, None)),
    (400, b'{"object":"error","message":"vllm says","code":400}', None,
     ("invalid_request_error", "vllm says", False, None)),
    (422, b'{"detail":"fastapi says"}', None,
     ("invalid_request_error", "fastapi says", False, None)),
])
def test_error_mapping(status: int, body: bytes, retry_after: str | None,
                       expected: tuple[str, str, bool, float | None]) -> None:
    error = map_openai_error(status, body, retry_after)
    assert error.status == status
    assert (error.error_type, error.message, error.retryable, error.retry_after) == expected


def test_insufficient_quota_is_not_retried() -> None:
    body = b'{"error":{"message":"You exceeded your quota","type":"insufficient_quota",' \
           b'"code":"insufficient_quota"}}'
    quota = map_openai_error(429, body, None)
    assert (quota.status, quota.error_type, quota.retryable) == (429, "rate_limit_error", False)
    limited = map_openai_error(429, b'{"error":{"message":"slow","code":"rate_limit_exceeded"}}',
                               "2")
    assert (limited.retryable, limited.retry_after) == (True, 2.0)
