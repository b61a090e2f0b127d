"""An `Answer` spelled as OpenAI chat completions: JSON completion, `data:` chunks, errors."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import orjson

from fakeprovider.answer import Answer, Prompt, lead_split, split_json
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
)
from fakeprovider.ratelimit import NOMINAL_REQUESTS, NOMINAL_TOKENS, Allowance, duration

# OpenAI's (type, code) per status; anything else is a plain invalid_request_error / server_error.
_ERRORS: dict[int, tuple[str, str | None]] = {
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", "model_not_found"),
    429: ("requests", "rate_limit_exceeded"),
}

_FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",  # OpenAI does not say which stop string matched
    "max_tokens": "length",
    "tool_use": "tool_calls",
}


def _data(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def _error(message: str, error_type: str, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": None, "code": code}}


class OpenAIDialect:
    answer_id_prefix = "chatcmpl-fake-"
    tool_id_prefix = "call_fake_"

    def parse(self, body: bytes) -> Prompt:
        data = load_object(body)
        model, messages = model_and_messages(data)
        options = data.get("stream_options")
        return Prompt(
            model=model,
            text=last_user_text(messages),
            input_words=message_words(messages),
            max_tokens=max_tokens(data, "max_completion_tokens", "max_tokens"),
            stream=data.get("stream") is True,
            include_usage=isinstance(options, dict) and options.get("include_usage") is True,
            stop_sequences=string_list(data, "stop", single=True),
        )

    def error_body(self, status: int, message: str, request_id: str) -> bytes:
        # OpenAI's error body carries no request id; `x-request-id` does.
        default = ("server_error" if status >= 500 else "invalid_request_error", None)
        return orjson.dumps(_error(message, *_ERRORS.get(status, default)))

    def stream_error(self, request_id: str) -> bytes:
        return _data(_error(MID_STREAM_ERROR, "server_error", None))

    def headers(self, request_id: str, allowance: Allowance | None) -> dict[str, str]:
        if allowance is None:
            requests = (NOMINAL_REQUESTS, NOMINAL_REQUESTS, 0.0)
        else:
            requests = (allowance.per_minute, allowance.remaining, allowance.reset_after)
        tokens = NOMINAL_TOKENS["tokens"]
        out = {
            "request-id": request_id,
            "x-request-id": request_id,
            "x-ratelimit-limit-requests": str(requests[0]),
            "x-ratelimit-remaining-requests": str(requests[1]),
            "x-ratelimit-reset-requests": duration(requests[2]),
            "x-ratelimit-limit-tokens": str(tokens),
            "x-ratelimit-remaining-tokens": str(tokens),
            "x-ratelimit-reset-tokens": duration(0.0),
        }
        if allowance is not None and not allowance.allowed:
            out["retry-after"] = str(allowance.retry_after)
        return out

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
        for piece in lead_split(self._content(answer), answer.lead, chunks):
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
