"""An `Answer` spelled as Anthropic Messages: JSON message, SSE events, errors and headers."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import orjson

from fakeprovider.answer import (
    Answer,
    Prompt,
    ThinkingDisplay,
    count_words,
    lead_split,
    split_json,
    split_text,
)
from fakeprovider.protocol import (
    MID_STREAM_ERROR,
    Frame,
    FrameKind,
    last_user_text,
    load_object,
    max_tokens,
    message_words,
    model_and_messages,
    string_list,
    texts,
)
from fakeprovider.ratelimit import NOMINAL_REQUESTS, NOMINAL_TOKENS, Allowance, rfc3339_after

# Anthropic's error type per status; other 4xx are invalid_request_error, other 5xx api_error.
# Kept here rather than borrowed from the gateway: the fake stands for Anthropic, not for Ferry.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def error_type(status: int) -> str:
    return ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")


def error_envelope(error: str, message: str, request_id: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error, "message": message}, "request_id": request_id}


def _sse(event: str, payload: dict[str, Any]) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


def _event(name: str, kind: FrameKind = "event", **fields: Any) -> Frame:
    """An event frame; the payload's `type` always repeats the event name."""
    return Frame(kind, _sse(name, {"type": name, **fields}))


def _thinking(value: Any) -> ThinkingDisplay | None:
    """Thinking is on for `enabled` and `adaptive`; anything else (or nothing) leaves it off."""
    if not isinstance(value, dict) or value.get("type") not in ("enabled", "adaptive"):
        return None
    return "omitted" if value.get("display") == "omitted" else "shown"


def input_words(data: dict[str, Any], messages: list[dict[str, Any]]) -> int:
    """Words in the system prompt, the messages and the tools' names and descriptions."""
    words = sum(count_words(t) for t in texts(data.get("system"))) + message_words(messages)
    tools = data.get("tools")
    for tool in tools if isinstance(tools, list) else []:
        if isinstance(tool, dict):
            words += sum(
                count_words(tool[name])
                for name in ("name", "description")
                if isinstance(tool.get(name), str)
            )
    return words


class AnthropicDialect:
    answer_id_prefix = "msg_fake_"
    tool_id_prefix = "toolu_fake_"

    def parse(self, body: bytes) -> Prompt:
        data = load_object(body)
        model, messages = model_and_messages(data)
        return Prompt(
            model=model,
            text=last_user_text(messages),
            input_words=input_words(data, messages),
            max_tokens=max_tokens(data, "max_tokens", minimum=0),
            stream=data.get("stream") is True,
            stop_sequences=string_list(data, "stop_sequences"),
            thinking=_thinking(data.get("thinking")),
        )

    def parse_count(self, body: bytes) -> Prompt:
        """A count_tokens request: checked like Messages, minus `max_tokens`."""
        data = load_object(body)
        model, messages = model_and_messages(data)
        return Prompt(model, last_user_text(messages), input_words(data, messages))

    def error_body(self, status: int, message: str, request_id: str) -> bytes:
        return orjson.dumps(error_envelope(error_type(status), message, request_id))

    def stream_error(self, request_id: str) -> bytes:
        return _sse("error", error_envelope("overloaded_error", MID_STREAM_ERROR, request_id))

    def headers(self, request_id: str, allowance: Allowance | None) -> dict[str, str]:
        now = datetime.now(UTC)
        limits: dict[str, tuple[int, int, float]] = {
            kind: (limit, limit, 0.0) for kind, limit in NOMINAL_TOKENS.items()
        }
        if allowance is None:
            limits["requests"] = (NOMINAL_REQUESTS, NOMINAL_REQUESTS, 0.0)
        else:
            limits["requests"] = (allowance.per_minute, allowance.remaining, allowance.reset_after)
        out = {"request-id": request_id}
        for kind in ("requests", "tokens", "input-tokens", "output-tokens"):
            limit, remaining, reset_after = limits[kind]
            prefix = f"anthropic-ratelimit-{kind}"
            out[f"{prefix}-limit"] = str(limit)
            out[f"{prefix}-remaining"] = str(remaining)
            out[f"{prefix}-reset"] = rfc3339_after(reset_after, now)
        if allowance is not None and not allowance.allowed:
            out["retry-after"] = str(allowance.retry_after)
        return out

    def message(self, answer: Answer) -> bytes:
        return orjson.dumps(
            {
                "id": answer.id,
                "type": "message",
                "role": "assistant",
                "model": answer.model,
                "content": self._blocks(answer),
                "stop_reason": answer.stop_reason,
                "stop_sequence": answer.stop_sequence,
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
        text_index = 0
        for index, block in enumerate(self._blocks(answer)):
            opening: dict[str, Any]
            deltas: list[dict[str, Any]]
            if block["type"] == "thinking":
                opening = {"type": "thinking", "thinking": "", "signature": ""}
                pieces = split_text(block["thinking"], chunks)
                deltas = [{"type": "thinking_delta", "thinking": p} for p in pieces]
                deltas.append({"type": "signature_delta", "signature": block["signature"]})
            elif block["type"] == "text":
                opening = {"type": "text", "text": ""}
                lead = answer.lead if text_index == 0 else 0
                pieces = lead_split(block["text"], lead, chunks)
                deltas = [{"type": "text_delta", "text": p} for p in pieces]
                text_index += 1
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
            delta={"stop_reason": answer.stop_reason, "stop_sequence": answer.stop_sequence},
            # Cumulative, as Anthropic sends it today: input and cache counts repeated.
            usage=self._usage(answer.input_tokens, answer.output_tokens),
        )
        yield _event("message_stop")

    @staticmethod
    def _blocks(answer: Answer) -> list[dict[str, Any]]:
        blocks: list[dict[str, Any]] = []
        if answer.thinking is not None:
            blocks.append(
                {"type": "thinking", "thinking": answer.thinking, "signature": answer.signature}
            )
        blocks += [{"type": "text", "text": t} for t in answer.texts]
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
