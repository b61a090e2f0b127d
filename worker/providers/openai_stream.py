"""OpenAI chat-completion chunks → Anthropic stream events, incrementally. Pure: no I/O.

`SSEDataParser` cuts the bytes of an SSE body into `data` payloads as they arrive;
`OpenAIStreamTranslator` turns each parsed chunk into Anthropic events. Anthropic's blocks are
sequential (each started, filled and stopped before the next), so the text and every tool call
(keyed by OpenAI's `index`) each become their own block, closed when something else begins.
OpenAI sends usage in a last chunk with no choices, after `message_start` had to go out: the
final input and output token counts are therefore carried by `message_delta`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from worker.providers.base import ProviderError, SSEEvent
from worker.providers.openai_translate import (
    INVALID_TOOL_ARGUMENTS,
    as_object,
    map_finish_reason,
    new_id,
    openai_error_type,
    parse_tool_arguments,
)

Json = dict[str, Any]

_EOL = re.compile(rb"\r\n|\r|\n")
_RATE_LIMITED = {"rate_limit_exceeded", "requests", "tokens"}


class SSEDataParser:
    """Incremental SSE parsing (WHATWG rules for lines and `data` fields): bytes in, complete
    event payloads out. Other fields (`event`, `id`, `retry`) and comments are ignored."""

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[bytes] = []

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        payloads: list[bytes] = []
        pos = 0
        while (match := _EOL.search(self._buffer, pos)) is not None:
            if match.group() == b"\r" and match.end() == len(self._buffer):
                break  # perhaps the first half of a CRLF split across reads
            self._line(self._buffer[pos : match.start()], payloads)
            pos = match.end()
        self._buffer = self._buffer[pos:]
        return payloads

    def close(self) -> list[bytes]:
        """Payloads left at the end of the body; lenient about a missing final blank line."""
        payloads: list[bytes] = []
        if self._buffer:
            self._line(self._buffer.rstrip(b"\r"), payloads)
            self._buffer = b""
        self._line(b"", payloads)
        return payloads

    def _line(self, line: bytes, payloads: list[bytes]) -> None:
        if not line:
            if self._data:
                payloads.append(b"\n".join(self._data))
                self._data = []
        elif line.startswith(b"data:"):
            value = line[5:]
            self._data.append(value[1:] if value.startswith(b" ") else value)


@dataclass
class _Block:
    index: int
    kind: str  # "text" or "tool_use"
    arguments: list[str] = field(default_factory=list)


class _Fault(Exception):
    """The stream cannot be translated further; reported as an `error` event."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message


def _event(name: str, **fields: Any) -> SSEEvent:
    return SSEEvent(name, orjson.dumps({"type": name, **fields}))


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class OpenAIStreamTranslator:
    """Feed it every parsed chunk, then call `finish()` at `[DONE]`; each call returns the
    Anthropic events to send. After an `error` event it returns nothing more."""

    def __init__(self, model: str, stop_sequences: Sequence[str] = ()) -> None:
        self._model = model
        self._stop_sequences = tuple(stop_sequences)
        self._started = False
        self.done = False
        self._blocks = 0
        self._open: _Block | None = None
        self._tools: dict[int, _Block] = {}  # OpenAI tool-call index → its block
        self._refused = False
        self.finish_reason: str | None = None
        self._matched_stop: Any = None
        self.input_tokens = 0
        self.output_tokens = 0

    def feed(self, chunk: Json) -> list[SSEEvent]:
        if self.done:
            return []
        if chunk.get("error") is not None:
            return self.fail(*_error_detail(chunk["error"]))
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.input_tokens = _int(usage.get("prompt_tokens")) or self.input_tokens
            self.output_tokens = _int(usage.get("completion_tokens")) or self.output_tokens
        events = self._start(chunk)
        try:
            choices = chunk.get("choices")
            for choice in choices if isinstance(choices, list) else []:
                if isinstance(choice, dict) and choice.get("index", 0) == 0:
                    events += self._choice(choice)
        except _Fault as fault:
            events += self.fail(fault.error_type, fault.message)
        return events

    def finish(self) -> list[SSEEvent]:
        """The upstream said `[DONE]`: close what is open and end the message."""
        if self.done:
            return []
        events = self._start({})
        try:
            events += self._close()
        except _Fault as fault:
            return events + self.fail(fault.error_type, fault.message)
        stop_reason, stop_sequence = map_finish_reason(
            self.finish_reason, self._matched_stop, self._stop_sequences, bool(self._tools)
        )
        if self._refused:
            stop_reason = "refusal"
        usage = {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens}
        events.append(_event(
            "message_delta",
            delta={"stop_reason": stop_reason, "stop_sequence": stop_sequence},
            usage=usage,
        ))
        events.append(_event("message_stop"))
        self.done = True
        return events

    def fail(self, error_type: str, message: str) -> list[SSEEvent]:
        """End the stream with an Anthropic `error` event (the adapter uses it for I/O faults)."""
        if self.done:
            return []
        self.done = True
        return [_event("error", error={"type": error_type, "message": message})]

    def _start(self, chunk: Json) -> list[SSEEvent]:
        if self._started:
            return []
        self._started = True
        chunk_id = chunk.get("id")
        message: Json = {
            "id": f"msg_{chunk_id}" if isinstance(chunk_id, str) and chunk_id else new_id("msg_"),
            "type": "message",
            "role": "assistant",
            "model": self._model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {
                "input_tokens": self.input_tokens,
                "output_tokens": 0,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
            },
        }
        return [_event("message_start", message=message)]

    def _choice(self, choice: Json) -> list[SSEEvent]:
        events: list[SSEEvent] = []
        delta = as_object(choice.get("delta"))
        for key in ("content", "refusal"):
            text = delta.get(key)
            if isinstance(text, str) and text:
                self._refused = self._refused or key == "refusal"
                events += self._text(text)
        calls = delta.get("tool_calls")
        for call in calls if isinstance(calls, list) else []:
            if isinstance(call, dict):
                events += self._tool_piece(call)
        if choice.get("finish_reason"):
            self.finish_reason = str(choice["finish_reason"])
            self._matched_stop = choice.get("stop_reason")
            events += self._close()
        return events

    def _text(self, text: str) -> list[SSEEvent]:
        events: list[SSEEvent] = []
        if self._open is None or self._open.kind != "text":
            events += self._open_block("text", {"type": "text", "text": ""})
        assert self._open is not None
        delta = {"type": "text_delta", "text": text}
        return [*events, _event("content_block_delta", index=self._open.index, delta=delta)]

    def _tool_piece(self, call: Json) -> list[SSEEvent]:
        events: list[SSEEvent] = []
        position = _int(call.get("index")) or 0
        function = as_object(call.get("function"))
        arguments = function.get("arguments")
        if isinstance(arguments, dict):
            arguments = json.dumps(arguments)
        arguments = arguments if isinstance(arguments, str) else ""
        block = self._tools.get(position)
        if block is None:
            call_id, name = call.get("id"), function.get("name")
            opening = {
                "type": "tool_use",
                "id": call_id if isinstance(call_id, str) and call_id else new_id("toolu_"),
                "name": name if isinstance(name, str) else "",
                "input": {},
            }
            events += self._open_block("tool_use", opening)
            block = self._open
            assert block is not None
            self._tools[position] = block
        elif block is not self._open and arguments:
            raise _Fault("api_error", "the provider interleaved the arguments of several tool "
                                      "calls, which Anthropic's stream format cannot express")
        if arguments:
            block.arguments.append(arguments)
            delta = {"type": "input_json_delta", "partial_json": arguments}
            events.append(_event("content_block_delta", index=block.index, delta=delta))
        return events

    def _open_block(self, kind: str, content_block: Json) -> list[SSEEvent]:
        events = self._close()
        self._open = _Block(self._blocks, kind)
        self._blocks += 1
        return [*events, _event("content_block_start", index=self._open.index,
                                content_block=content_block)]

    def _close(self) -> list[SSEEvent]:
        block, self._open = self._open, None
        if block is None:
            return []
        if block.kind == "tool_use":
            try:
                parse_tool_arguments("".join(block.arguments))
            except ProviderError:
                raise _Fault("api_error", INVALID_TOOL_ARGUMENTS) from None
        return [_event("content_block_stop", index=block.index)]


def _error_detail(error: Any) -> tuple[str, str]:
    """Anthropic's (type, message) for an OpenAI mid-stream `{"error": ...}` object."""
    if isinstance(error, str) and error:
        return "api_error", error
    if not isinstance(error, dict):
        return "api_error", "the provider reported an error mid-stream"
    message = error.get("message")
    if not isinstance(message, str) or not message:
        message = "the provider reported an error mid-stream"
    code = _int(error.get("code"))
    if code is not None and code >= 400:
        return openai_error_type(code), message
    if error.get("type") in _RATE_LIMITED or error.get("code") in _RATE_LIMITED:
        return "rate_limit_error", message
    return "api_error", message
