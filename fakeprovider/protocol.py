"""What both dialects share: the `Dialect` interface, stream frames and request-reading helpers."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import orjson

from fakeprovider.answer import Answer, InvalidRequest, Prompt, count_words
from fakeprovider.ratelimit import Allowance

MID_STREAM_ERROR = "fake provider failure mid-stream"

# `delta` frames carry content (a text, thinking, signature or tool-input piece); `tail` is the
# first closing frame. Stream faults (`error_after`, `drop_after`, `stall_after`) count deltas
# and strike before the next delta, or at the tail.
FrameKind = Literal["event", "delta", "tail"]


@dataclass(frozen=True)
class Frame:
    kind: FrameKind
    data: bytes


class Dialect(Protocol):
    answer_id_prefix: str
    tool_id_prefix: str

    def parse(self, body: bytes) -> Prompt: ...

    def error_body(self, status: int, message: str, request_id: str) -> bytes: ...

    def stream_error(self, request_id: str) -> bytes:
        """Sent in place of the rest of a stream, for `error_after`."""
        ...

    def message(self, answer: Answer) -> bytes: ...

    def frames(
        self, answer: Answer, chunks: int | None, include_usage: bool
    ) -> Iterator[Frame]: ...

    def headers(self, request_id: str, allowance: Allowance | None) -> dict[str, str]:
        """Request id and rate-limit headers; `allowance` None when the key is not limited."""
        ...


def load_object(body: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidRequest("request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise InvalidRequest("request body must be a JSON object")
    return data


def model_and_messages(data: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("model: Field required")
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages: Field required (a non-empty list)")
    if not all(isinstance(m, dict) for m in messages):
        raise InvalidRequest("messages: each message must be an object")
    return model, messages


def max_tokens(data: dict[str, Any], *fields: str, minimum: int = 1) -> int | None:
    """Anthropic takes 0 (a cache warm-up that generates nothing); OpenAI wants at least 1."""
    value = next((data[f] for f in fields if data.get(f) is not None), None)
    if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or value < minimum):
        raise InvalidRequest(f"{fields[0]}: must be an integer >= {minimum}")
    return value


def string_list(data: dict[str, Any], name: str, single: bool = False) -> tuple[str, ...]:
    """A list of strings (or, with `single`, one string) at `name`; empty ones are dropped."""
    value = data.get(name)
    if value is None:
        return ()
    if single and isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        kind = "a string or a list of strings" if single else "a list of strings"
        raise InvalidRequest(f"{name}: must be {kind}")
    return tuple(v for v in value if v)


def texts(content: Any) -> list[str]:
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
            out.extend(texts(part.get("content")))
    return out


def message_words(messages: list[dict[str, Any]]) -> int:
    return sum(count_words(t) for m in messages for t in texts(m.get("content")))


def last_user_text(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                # Only the message's own text parts, not tool results it carries.
                content = [p for p in content if isinstance(p, dict) and p.get("type") == "text"]
            return "".join(texts(content))
    return ""
