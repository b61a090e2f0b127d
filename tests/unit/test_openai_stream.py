"""OpenAI stream chunks → Anthropic events (recorded chunk sequences), and the SSE data parser."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from worker.providers.openai_stream import OpenAIStreamTranslator, SSEDataParser

Json = dict[str, Any]
Events = list[tuple[str, Json]]
ZERO_CACHE = {"cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}


def chunk(delta: Json | None = None, finish: str | None = None, **choice: Any) -> Json:
    return {
        "id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "gpt-up", "usage": None,
        "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish, **choice}],
    }


def usage(prompt: int, completion: int) -> Json:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": [],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                      "total_tokens": prompt + completion}}


def tool(index: int, arguments: str, call_id: str | None = None, name: str | None = None) -> Json:
    function: Json = {"arguments": arguments}
    opening: Json = {}
    if call_id is not None:
        opening = {"id": call_id, "type": "function"}
        function["name"] = name
    return {"tool_calls": [{"index": index, **opening, "function": function}]}


ROLE = chunk({"role": "assistant", "content": ""})


def start(input_tokens: int = 0) -> tuple[str, Json]:
    return ("message_start", {"type": "message_start", "message": {
        "id": "msg_chatcmpl-1", "type": "message", "role": "assistant", "model": "claude-x",
        "content": [], "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": input_tokens, "output_tokens": 0, **ZERO_CACHE}}})


def open_text(index: int) -> tuple[str, Json]:
    return ("content_block_start", {"type": "content_block_start", "index": index,
                                    "content_block": {"type": "text", "text": ""}})


def open_tool(index: int, call_id: str, name: str) -> tuple[str, Json]:
    block = {"type": "tool_use", "id": call_id, "name": name, "input": {}}
    return ("content_block_start",
            {"type": "content_block_start", "index": index, "content_block": block})


def text(index: int, value: str) -> tuple[str, Json]:
    return ("content_block_delta", {"type": "content_block_delta", "index": index,
                                    "delta": {"type": "text_delta", "text": value}})


def args(index: int, value: str) -> tuple[str, Json]:
    return ("content_block_delta", {"type": "content_block_delta", "index": index,
                                    "delta": {"type": "input_json_delta", "partial_json": value}})


def stop(index: int) -> tuple[str, Json]:
    return ("content_block_stop", {"type": "content_block_stop", "index": index})


def end(reason: str, input_tokens: int, output_tokens: int,
        sequence: str | None = None) -> Events:
    return [("message_delta", {"type": "message_delta",
                               "delta": {"stop_reason": reason, "stop_sequence": sequence},
                               "usage": {"input_tokens": input_tokens,
                                         "output_tokens": output_tokens}}),
            ("message_stop", {"type": "message_stop"})]


def error(kind: str, message: str) -> tuple[str, Json]:
    return ("error", {"type": "error", "error": {"type": kind, "message": message}})


BAD_ARGS = "provider returned invalid tool arguments"
INTERLEAVED = ("the provider interleaved the arguments of several tool calls, which "
               "Anthropic's stream format cannot express")

STREAM_CASES: list[tuple[str, list[Json], Events]] = [
    ("text only, usage last",
     [ROLE, chunk({"content": "Hel"}), chunk({"content": "lo"}), chunk({}, "stop"), usage(3, 2)],
     [start(), open_text(0), text(0, "Hel"), text(0, "lo"), stop(0), *end("end_turn", 3, 2)]),
    ("one tool call, arguments in three pieces",
     [chunk({"role": "assistant", "content": None}), chunk(tool(0, "", "call_1", "get")),
      chunk(tool(0, '{"q"')), chunk(tool(0, ':"x",')), chunk(tool(0, '"n":1}')),
      chunk({}, "tool_calls"), usage(5, 10)],
     [start(), open_tool(0, "call_1", "get"), args(0, '{"q"'), args(0, ':"x",'),
      args(0, '"n":1}'), stop(0), *end("tool_use", 5, 10)]),
    ("two tool calls interleaved with text",
     [ROLE, chunk({"content": "a"}), chunk(tool(0, '{"n":', "call_1", "get")),
      chunk(tool(0, "1}")), chunk({"content": "b"}), chunk({"content": "c"}),
      chunk(tool(1, "{}", "call_2", "put")), chunk({}, "tool_calls"), usage(4, 22)],
     [start(), open_text(0), text(0, "a"), stop(0), open_tool(1, "call_1", "get"),
      args(1, '{"n":'), args(1, "1}"), stop(1), open_text(2), text(2, "b"), text(2, "c"),
      stop(2), open_tool(3, "call_2", "put"), args(3, "{}"), stop(3), *end("tool_use", 4, 22)]),
    ("several tool calls in one chunk",
     [chunk({"tool_calls": [tool(0, "{}", "c0", "a")["tool_calls"][0],
                            tool(1, '{"k":2}', "c1", "b")["tool_calls"][0]]}, "tool_calls")],
     [start(), open_tool(0, "c0", "a"), args(0, "{}"), stop(0), open_tool(1, "c1", "b"),
      args(1, '{"k":2}'), stop(1), *end("tool_use", 0, 0)]),
    ("usage on the first chunk reaches message_start",
     [{**chunk({"content": "x"}), "usage": {"prompt_tokens": 9, "completion_tokens": 0}},
      chunk({}, "length"), usage(9, 1)],
     [start(9), open_text(0), text(0, "x"), stop(0), *end("max_tokens", 9, 1)]),
    ("no usage chunk", [chunk({"content": "x"}, "stop")],
     [start(), open_text(0), text(0, "x"), stop(0), *end("end_turn", 0, 0)]),
    ("matched stop sequence reported by the server (vLLM)",
     [chunk({"content": "x"}), chunk({}, "stop", stop_reason="END")],
     [start(), open_text(0), text(0, "x"), stop(0), *end("stop_sequence", 0, 0, "END")]),
    ("refusal", [chunk({"refusal": "No."}), chunk({}, "stop")],
     [start(), open_text(0), text(0, "No."), stop(0), *end("refusal", 0, 0)]),
    ("content_filter", [chunk({"content": "x"}), chunk({}, "content_filter")],
     [start(), open_text(0), text(0, "x"), stop(0), *end("refusal", 0, 0)]),
    ("no content", [ROLE, chunk({}, "stop")], [start(), *end("end_turn", 0, 0)]),
    ("mid-stream error",
     [ROLE, chunk({"content": "echo: "}),
      {"error": {"message": "fake failure", "type": "server_error", "param": None, "code": None}},
      chunk({"content": "ignored"}), usage(1, 1)],
     [start(), open_text(0), text(0, "echo: "), error("api_error", "fake failure")]),
    ("mid-stream rate limit",
     [ROLE, {"error": {"message": "slow down", "type": "requests", "code": "rate_limit_exceeded"}}],
     [start(), error("rate_limit_error", "slow down")]),
    ("mid-stream error with a status code",
     [{"error": {"message": "busy", "code": 529}}], [error("overloaded_error", "busy")]),
    ("invalid tool arguments",
     [chunk(tool(0, '{"q":', "c", "get")), chunk({}, "tool_calls")],
     [start(), open_tool(0, "c", "get"), args(0, '{"q":'), error("api_error", BAD_ARGS)]),
    ("arguments for a closed tool call",
     [chunk(tool(0, "{}", "c0", "a")), chunk(tool(1, "{}", "c1", "b")), chunk(tool(0, " "))],
     [start(), open_tool(0, "c0", "a"), args(0, "{}"), stop(0), open_tool(1, "c1", "b"),
      args(1, "{}"), error("api_error", INTERLEAVED)]),
    ("an empty piece for a closed tool call is harmless",
     [chunk(tool(0, "{}", "c0", "a")), chunk(tool(1, "", "c1", "b")), chunk(tool(0, "")),
      chunk({}, "tool_calls")],
     [start(), open_tool(0, "c0", "a"), args(0, "{}"), stop(0), open_tool(1, "c1", "b"),
      stop(1), *end("tool_use", 0, 0)]),
    ("arguments sent as an object, id and name missing",
     [chunk({"tool_calls": [{"index": 0, "function": {"arguments": {"k": 1}}}]}),
      chunk({}, "tool_calls")],
     [start(), open_tool(0, "ID", ""), args(0, '{"k": 1}'), stop(0), *end("tool_use", 0, 0)]),
]


def run(chunks: list[Json]) -> Events:
    translator = OpenAIStreamTranslator("claude-x", ["END"])
    events = [e for c in chunks for e in translator.feed(c)] + translator.finish()
    assert translator.finish() == [] and translator.feed(chunk({"content": "late"})) == []
    decoded = []
    for event in events:
        data = orjson.loads(event.data)
        assert event.data == orjson.dumps(data)  # compact JSON, as sent
        assert data["type"] == event.event
        block = data.get("content_block", {})
        if block.get("type") == "tool_use" and not block["id"].startswith("c"):
            assert block["id"].startswith("toolu_") and len(block["id"]) == 30
            block["id"] = "ID"  # OpenAI sent none: a fresh one
        decoded.append((event.event, data))
    return decoded


@pytest.mark.parametrize(("chunks", "expected"), [c[1:] for c in STREAM_CASES],
                         ids=[c[0] for c in STREAM_CASES])
def test_stream(chunks: list[Json], expected: Events) -> None:
    translator_events = run(chunks)
    assert translator_events == expected


def test_stream_without_id_gets_fresh_one() -> None:
    translator = OpenAIStreamTranslator("m", ["##"])
    [event] = translator.feed({"choices": []})
    message_id = orjson.loads(event.data)["message"]["id"]
    assert message_id.startswith("msg_") and len(message_id) == 28


def test_fail_ends_the_stream() -> None:
    translator = OpenAIStreamTranslator("m")
    translator.feed(chunk({"content": "x"}))
    [event] = translator.fail("api_error", "lost")
    assert (event.event, orjson.loads(event.data)) == error("api_error", "lost")
    assert translator.done and translator.fail("api_error", "again") == []


# --- SSE data parsing -------------------------------------------------------------------------

SSE_CASES: list[tuple[str, bytes, list[bytes]]] = [
    ("openai style", b'data: {"a":1}\n\ndata: [DONE]\n\n', [b'{"a":1}', b"[DONE]"]),
    ("crlf and cr line ends", b"data: a\r\n\r\ndata: b\r\rdata: c\n\n", [b"a", b"b", b"c"]),
    ("multi-line data, no space after colon", b"data:x\ndata: y\n\n", [b"x\ny"]),
    ("multi-line data with crlf", b"data: x\r\ndata: y\r\n\r\n", [b"x\ny"]),
    ("comments and other fields ignored",
     b": keep-alive\nevent: chunk\nid: 4\ndata: z\nretry: 5\n\n", [b"z"]),
    ("blank lines alone dispatch nothing", b"\n\n\ndata: q\n\n", [b"q"]),
    ("no final blank line", b"data: last", [b"last"]),
]


@pytest.mark.parametrize(("body", "expected"), [c[1:] for c in SSE_CASES],
                         ids=[c[0] for c in SSE_CASES])
@pytest.mark.parametrize("piece", [1, 2, 3, 1000])
def test_sse_parser(body: bytes, expected: list[bytes], piece: int) -> None:
    parser = SSEDataParser()
    payloads = []
    for i in range(0, len(body), piece):
        payloads += parser.feed(body[i : i + piece])
    assert payloads + parser.close() == expected


def test_sse_parser_is_incremental() -> None:
    parser = SSEDataParser()
    assert parser.feed(b'data: {"a"') == []
    assert parser.feed(b":1}\n") == []
    assert parser.feed(b"\ndata: [DO") == [b'{"a":1}']
    assert parser.feed(b"NE]\n\n") == [b"[DONE]"]
    assert parser.close() == []
