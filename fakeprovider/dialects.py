"""How an `Answer` is spelled on the wire: Anthropic Messages or OpenAI chat completions.

Each dialect parses its request into a `Prompt` and renders answers, errors and stream frames
as bytes; the server only decides what to send and when.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import orjson

from fakeprovider.answer import (
    Answer,
    InvalidRequest,
    Prompt,
    count_words,
    split_json,
    split_text,
)
from shared.wire import ErrorEnvelope, error_type_for_status

MID_STREAM_ERROR = "fake provider failure mid-stream"

FrameKind = Literal["event", "delta", "tail"]


@dataclass(frozen=True)
class Frame:
    """One stream frame. `delta` frames carry content; `tail` is the first closing frame."""

    kind: FrameKind
    data: bytes


class Dialect(Protocol):
    answer_id_prefix: str
    tool_id_prefix: str
    stream_error: bytes  # sent in place of the rest of a stream, for `error_after`

    def parse(self, body: bytes) -> Prompt: ...

    def error_body(self, status: int, message: str) -> bytes: ...

    def message(self, answer: Answer) -> bytes: ...

    def frames(
        self, answer: Answer, chunks: int | None, include_usage: bool
    ) -> Iterator[Frame]: ...


def _load_object(body: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidRequest("request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise InvalidRequest("request body must be a JSON object")
    return data


def _common_fields(data: dict[str, Any], *token_fields: str) -> tuple[str, list[Any], int | None]:
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("model: Field required")
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages: Field required (a non-empty list)")
    if not all(isinstance(m, dict) for m in messages):
        raise InvalidRequest("messages: each message must be an object")
    max_tokens = next((data[f] for f in token_fields if data.get(f) is not None), None)
    if max_tokens is not None and (
        not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1
    ):
        raise InvalidRequest(f"{token_fields[0]}: must be an integer >= 1")
    return model, messages, max_tokens


def _texts(content: Any) -> list[str]:
    """Text of a message content: a string, or the `text` parts (tool results included)."""
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        return []
    out: list[str] = []
    for part in content:
        if not isinstance(part, dict):
            continue
        if part.get("type") == "text" and isinstance(part.get("text"), str):
            out.append(part["text"])
        elif part.get("type") == "tool_result":
            out.extend(_texts(part.get("content")))
    return out


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                # Only the message's own text parts, not tool results it carries.
                content = [p for p in content if isinstance(p, dict) and p.get("type") == "text"]
            return "".join(_texts(content))
    return ""


def _sse(event: str, payload: dict[str, Any]) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


def _event(name: str, kind: FrameKind = "event", **fields: Any) -> Frame:
    """An Anthropic event frame; the payload's `type` always repeats the event name."""
    return Frame(kind, _sse(name, {"type": name, **fields}))


class AnthropicDialect:
    answer_id_prefix = "msg_fake_"
    tool_id_prefix = "toolu_fake_"
    stream_error = _sse(
        "error",
        ErrorEnvelope.of("overloaded_error", MID_STREAM_ERROR).model_dump(exclude_none=True),
    )

    def parse(self, body: bytes) -> Prompt:
        data = _load_object(body)
        model, messages, max_tokens = _common_fields(data, "max_tokens")
        words = sum(count_words(t) for t in _texts(data.get("system")))
        words += sum(count_words(t) for m in messages for t in _texts(m.get("content")))
        return Prompt(
            model=model,
            text=_last_user_text(messages),
            input_words=words,
            max_tokens=max_tokens,
            stream=data.get("stream") is True,
        )

    def error_body(self, status: int, message: str) -> bytes:
        return ErrorEnvelope.of(error_type_for_status(status), message).to_json()

    def message(self, answer: Answer) -> bytes:
        return orjson.dumps(
            {
                "id": answer.id,
                "type": "message",
                "role": "assistant",
                "model": answer.model,
                "content": self._blocks(answer),
                "stop_reason": answer.stop_reason,
                "stop_sequence": None,
                "usage": self._usage(answer.input_tokens, answer.output_tokens),
            }
        )

    def frames(self, answer: Answer, chunks: int | None, include_usage: bool) -> Iterator[Frame]:
        start: dict[str, Any] = {
            "id": answer.id,
            "type": "message",
            "role": "assistant",
            "model": answer.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": self._usage(answer.input_tokens, 1),
        }
        yield _event("message_start", message=start)
        for index, block in enumerate(self._blocks(answer)):
            opening: dict[str, Any]
            if block["type"] == "text":
                opening = {"type": "text", "text": ""}
                pieces = split_text(block["text"], chunks)
                deltas = [{"type": "text_delta", "text": p} for p in pieces]
            else:
                opening = {**block, "input": {}}
                pieces = split_json(orjson.dumps(block["input"]).decode(), chunks)
                deltas = [{"type": "input_json_delta", "partial_json": p} for p in pieces]
            yield _event("content_block_start", index=index, content_block=opening)
            if index == 0:
                yield _event("ping")
            for delta in deltas:
                yield _event("content_block_delta", "delta", index=index, delta=delta)
            yield _event("content_block_stop", index=index)
        yield _event(
            "message_delta",
            "tail",
            delta={"stop_reason": answer.stop_reason, "stop_sequence": None},
            usage={"output_tokens": answer.output_tokens},
        )
        yield _event("message_stop")

    @staticmethod
    def _blocks(answer: Answer) -> list[dict[str, Any]]:
        blocks: list[dict[str, Any]] = [{"type": "text", "text": t} for t in answer.texts]
        blocks += [
            {"type": "tool_use", "id": c.id, "name": c.name, "input": c.input}
            for c in answer.tool_calls
        ]
        return blocks

    @staticmethod
    def _usage(input_tokens: int, output_tokens: int) -> dict[str, int]:
        return {
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        }


# OpenAI's (type, code) per status; anything else is a plain invalid_request_error / server_error.
_OPENAI_ERRORS: dict[int, tuple[str, str | None]] = {
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", "model_not_found"),
    429: ("requests", "rate_limit_exceeded"),
}

_FINISH_REASONS = {"end_turn": "stop", "max_tokens": "length", "tool_use": "tool_calls"}


def _data(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def _openai_error(message: str, error_type: str, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": None, "code": code}}


class OpenAIDialect:
    answer_id_prefix = "chatcmpl-fake-"
    tool_id_prefix = "call_fake_"
    stream_error = _data(_openai_error(MID_STREAM_ERROR, "server_error", None))

    def parse(self, body: bytes) -> Prompt:
        data = _load_object(body)
        model, messages, max_tokens = _common_fields(data, "max_completion_tokens", "max_tokens")
        options = data.get("stream_options")
        return Prompt(
            model=model,
            text=_last_user_text(messages),
            input_words=sum(count_words(t) for m in messages for t in _texts(m.get("content"))),
            max_tokens=max_tokens,
            stream=data.get("stream") is True,
            include_usage=isinstance(options, dict) and options.get("include_usage") is True,
        )

    def error_body(self, status: int, message: str) -> bytes:
        default = ("server_error" if status >= 500 else "invalid_request_error", None)
        return orjson.dumps(_openai_error(message, *_OPENAI_ERRORS.get(status, default)))

    def message(self, answer: Answer) -> bytes:
        message: dict[str, Any] = {"role": "assistant", "content": self._content(answer)}
        if answer.tool_calls:
            message["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": orjson.dumps(c.input).decode()},
                }
                for c in answer.tool_calls
            ]
        return orjson.dumps(
            {
                **self._envelope(answer, "chat.completion"),
                "choices": [
                    {
                        "index": 0,
                        "message": message,
                        "logprobs": None,
                        "finish_reason": _FINISH_REASONS[answer.stop_reason],
                    }
                ],
                "usage": self._usage(answer),
            }
        )

    def frames(self, answer: Answer, chunks: int | None, include_usage: bool) -> Iterator[Frame]:
        envelope = self._envelope(answer, "chat.completion.chunk")
        if include_usage:
            envelope["usage"] = None  # OpenAI sends null usage on every chunk but the last

        def chunk(kind: FrameKind, delta: dict[str, Any], finish: str | None = None) -> Frame:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return Frame(kind, _data({**envelope, "choices": [choice]}))

        yield chunk("event", {"role": "assistant", "content": ""})
        for piece in split_text(self._content(answer), chunks):
            yield chunk("delta", {"content": piece})
        for index, call in enumerate(answer.tool_calls):
            opening = {"id": call.id, "type": "function"}
            function = {"name": call.name, "arguments": ""}
            yield chunk(
                "event", {"tool_calls": [{"index": index, **opening, "function": function}]}
            )
            for piece in split_json(orjson.dumps(call.input).decode(), chunks):
                function = {"arguments": piece}
                yield chunk("delta", {"tool_calls": [{"index": index, "function": function}]})
        yield chunk("tail", {}, _FINISH_REASONS[answer.stop_reason])
        if include_usage:
            yield Frame("event", _data({**envelope, "choices": [], "usage": self._usage(answer)}))
        yield Frame("event", b"data: [DONE]\n\n")

    @staticmethod
    def _content(answer: Answer) -> str:
        # OpenAI has one content string: `blocks=N` texts are joined by newlines.
        return "\n".join(answer.texts)

    @staticmethod
    def _envelope(answer: Answer, obj: str) -> dict[str, Any]:
        return {"id": answer.id, "object": obj, "created": int(time.time()), "model": answer.model}

    @staticmethod
    def _usage(answer: Answer) -> dict[str, int]:
        return {
            "prompt_tokens": answer.input_tokens,
            "completion_tokens": answer.output_tokens,
            "total_tokens": answer.input_tokens + answer.output_tokens,
        }
