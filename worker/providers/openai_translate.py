"""Anthropic Messages ⇄ OpenAI chat completions, for OpenAI-compatible providers. Pure: no I/O.

Request (`translate_request`): `system` becomes the first `system` message; `tool_result` blocks
become `tool` messages placed before the rest of their user turn; `tool_use` blocks become the
assistant's `tool_calls`; tools, `tool_choice`, sampling fields, `stop_sequences`,
`metadata.user_id` and `stream` map to their OpenAI names.

Dropped, because OpenAI has no equivalent:
- `top_k`; `thinking: {"type": "disabled"}` (the default anyway) and `{"type": "adaptive"}`
  (the model decides whether to think; an OpenAI model simply answers);
- `thinking` / `redacted_thinking` blocks in assistant turns (they cannot be replayed to OpenAI);
- `cache_control` markers and text `citations`;
- unknown top-level fields (pydantic extras such as `service_tier`, `container`, `mcp_servers`):
  they are Anthropic features, meaningless to an OpenAI-compatible server;
- the `anthropic-version` / `anthropic-beta` headers (the adapter does not send them).

Mid-conversation `system` messages become OpenAI `system` messages in place.

Rejected with `TranslationError` (HTTP 400) because no faithful equivalent exists: enabled
`thinking`, `max_tokens: 0`, `document` blocks, unknown block types, images inside tool
results, images with a `file` source, server tools, and blocks in a turn whose role cannot
carry them.

Response (`translate_response`): text then one `tool_use` block per tool call; `finish_reason`
becomes `stop_reason`. OpenAI strips a matched stop sequence without saying which one matched,
so `stop` maps to `end_turn`, except when the server reports the matched string in the choice's
`stop_reason` (vLLM does) and it is one of the request's `stop_sequences`.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from typing import Any

import orjson

from shared.wire import (
    Base64ImageSource,
    ContentBlock,
    CustomTool,
    ImageBlock,
    MessagesRequest,
    RedactedThinkingBlock,
    TextBlock,
    ThinkingBlock,
    ThinkingEnabled,
    ToolChoiceAny,
    ToolChoiceAuto,
    ToolChoiceNone,
    ToolResultBlock,
    ToolUseBlock,
    URLImageSource,
    error_type_for_status,
)
from worker.providers.base import Headers, ProviderError, ProviderResponse, parse_retry_after

Json = dict[str, Any]

_CANNOT = "cannot be sent to an OpenAI-compatible provider"
INVALID_TOOL_ARGUMENTS = "provider returned invalid tool arguments"

_STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


class TranslationError(ProviderError):
    """The request cannot be expressed faithfully in OpenAI's format: the client's fault (400)."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(400, "invalid_request_error", f"{where}: {problem}", retryable=False)


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


def as_object(value: Any) -> Json:
    """`value` if it is a JSON object, else an empty one: provider answers are not trusted."""
    return value if isinstance(value, dict) else {}


# --- request ----------------------------------------------------------------------------------


def translate_request(
    request: MessagesRequest, model: str, *, stream: bool | None = None
) -> Json:
    """The body for `POST {base}/chat/completions`. `stream` overrides `request.stream`: the
    adapter knows whether it is making a streaming call."""
    if isinstance(request.thinking, ThinkingEnabled):
        raise TranslationError("thinking", f"extended thinking {_CANNOT}")
    if request.max_tokens == 0:
        raise TranslationError("max_tokens", f"0 (a cache warm-up) {_CANNOT}")
    out: Json = {"model": model, "messages": _messages(request), "max_tokens": request.max_tokens}
    if request.temperature is not None:
        out["temperature"] = request.temperature
    if request.top_p is not None:
        out["top_p"] = request.top_p
    if request.stop_sequences:
        out["stop"] = list(request.stop_sequences)
    if request.metadata is not None and request.metadata.user_id is not None:
        out["user"] = request.metadata.user_id
    if request.tools:
        out["tools"] = [_tool(i, tool) for i, tool in enumerate(request.tools)]
    choice = request.tool_choice
    if choice is not None:
        if isinstance(choice, ToolChoiceAuto):
            out["tool_choice"] = "auto"
        elif isinstance(choice, ToolChoiceAny):
            out["tool_choice"] = "required"
        elif isinstance(choice, ToolChoiceNone):
            out["tool_choice"] = "none"
        else:
            out["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
        if getattr(choice, "disable_parallel_tool_use", None):
            out["parallel_tool_calls"] = False
    if request.stream if stream is None else stream:
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    return out


def _messages(request: MessagesRequest) -> list[Json]:
    out: list[Json] = []
    system = request.system
    if system is not None:
        text = system if isinstance(system, str) else "\n\n".join(b.text for b in system)
        if text:
            out.append({"role": "system", "content": text})
    for i, message in enumerate(request.messages):
        if isinstance(message.content, str):
            out.append({"role": message.role, "content": message.content})
        elif message.role == "system":  # mid-conversation instructions
            out.append({"role": "system", "content": _system_text(f"messages.{i}",
                                                                  message.content)})
        elif message.role == "user":
            out.extend(_user_turn(f"messages.{i}", message.content))
        else:
            out.extend(_assistant_turn(f"messages.{i}", message.content))
    return out


def _system_text(where: str, blocks: list[ContentBlock]) -> str:
    texts = []
    for j, block in enumerate(blocks):
        if not isinstance(block, TextBlock):
            raise TranslationError(f"{where}.content.{j}",
                                   f"{block.type} blocks in a system message {_CANNOT}")
        texts.append(block.text)
    return "\n\n".join(texts)


def _user_turn(where: str, blocks: list[ContentBlock]) -> list[Json]:
    tool_messages: list[Json] = []
    parts: list[Json] = []
    for j, block in enumerate(blocks):
        at = f"{where}.content.{j}"
        if isinstance(block, ToolResultBlock):
            text = _result_text(at, block)
            tool_messages.append({"role": "tool", "tool_call_id": block.tool_use_id,
                                  "content": text})
        elif isinstance(block, TextBlock):
            parts.append({"type": "text", "text": block.text})
        elif isinstance(block, ImageBlock):
            parts.append(_image(at, block))
        elif isinstance(block, (ToolUseBlock, ThinkingBlock, RedactedThinkingBlock)):
            raise TranslationError(at, f"{block.type} blocks are only allowed in assistant turns")
        else:
            raise TranslationError(at, f"{block.type} blocks {_CANNOT}")
    if not parts:
        return tool_messages
    if len(parts) == 1 and parts[0]["type"] == "text":
        return [*tool_messages, {"role": "user", "content": parts[0]["text"]}]
    return [*tool_messages, {"role": "user", "content": parts}]


def _assistant_turn(where: str, blocks: list[ContentBlock]) -> list[Json]:
    texts: list[str] = []
    calls: list[Json] = []
    for j, block in enumerate(blocks):
        at = f"{where}.content.{j}"
        if isinstance(block, TextBlock):
            texts.append(block.text)
        elif isinstance(block, ToolUseBlock):
            function = {"name": block.name, "arguments": json.dumps(block.input)}
            calls.append({"id": block.id, "type": "function", "function": function})
        elif isinstance(block, (ThinkingBlock, RedactedThinkingBlock)):
            continue  # OpenAI has no way to replay them; see the module docstring
        elif isinstance(block, (ImageBlock, ToolResultBlock)):
            raise TranslationError(at, f"{block.type} blocks are only allowed in user turns")
        else:
            raise TranslationError(at, f"{block.type} blocks {_CANNOT}")
    if not texts and not calls:
        return []  # only thinking: nothing OpenAI can be shown
    content: str | list[Json] | None
    if not texts:
        content = None
    elif len(texts) == 1:
        content = texts[0]
    else:
        content = [{"type": "text", "text": t} for t in texts]
    message: Json = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = calls
    return [message]


def _result_text(at: str, block: ToolResultBlock) -> str:
    if block.content is None:
        text = ""
    elif isinstance(block.content, str):
        text = block.content
    else:
        texts = []
        for k, part in enumerate(block.content):
            if not isinstance(part, TextBlock):
                problem = f"{part.type} blocks inside a tool_result {_CANNOT}"
                raise TranslationError(f"{at}.content.{k}", problem)
            texts.append(part.text)
        text = "\n\n".join(texts)
    return f"Error: {text}" if block.is_error else text


def _image(at: str, block: ImageBlock) -> Json:
    source = block.source
    if isinstance(source, Base64ImageSource):
        url = f"data:{source.media_type};base64,{source.data}"
    elif isinstance(source, URLImageSource):
        url = source.url
    else:
        raise TranslationError(f"{at}.source", f"images with a file source {_CANNOT}")
    return {"type": "image_url", "image_url": {"url": url}}


def _tool(i: int, tool: Any) -> Json:
    if not isinstance(tool, CustomTool):
        raise TranslationError(f"tools.{i}", f"server tool {tool.type!r} {_CANNOT}")
    function: Json = {"name": tool.name, "parameters": tool.input_schema}
    if tool.description is not None:
        function["description"] = tool.description
    return {"type": "function", "function": function}


# --- response ---------------------------------------------------------------------------------


def map_finish_reason(
    finish_reason: Any, matched_stop: Any, stop_sequences: Sequence[str], tool_calls: bool
) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) for an OpenAI `finish_reason`. Unknown or missing reasons are
    `end_turn`; some servers say `stop` after tool calls, which Anthropic clients must see as
    `tool_use` or they will not run the tools."""
    if finish_reason == "stop" and isinstance(matched_stop, str) and matched_stop in stop_sequences:
        return "stop_sequence", matched_stop
    reason = _STOP_REASONS.get(str(finish_reason), "end_turn")
    if reason == "end_turn" and tool_calls:
        reason = "tool_use"
    return reason, None


def parse_tool_arguments(arguments: Any) -> Json:
    """A tool call's `arguments` JSON string as the Anthropic `input` object."""
    if arguments is None or (isinstance(arguments, str) and not arguments.strip()):
        return {}
    if isinstance(arguments, dict):
        return arguments  # some compatible servers send the object itself
    try:
        value = orjson.loads(arguments)
    except (orjson.JSONDecodeError, TypeError):
        value = None
    if not isinstance(value, dict):
        raise ProviderError(502, "api_error", INVALID_TOOL_ARGUMENTS)
    return value


def _bad_answer(message: str) -> ProviderError:
    return ProviderError(502, "api_error", message, retryable=False)


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # some compatible servers answer with content parts
        return "".join(
            p["text"] for p in content
            if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        )
    return ""


def _tool_use(call: Any) -> Json:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise _bad_answer("provider returned a tool call without a function name")
    call_id = call.get("id")
    return {
        "type": "tool_use",
        "id": call_id if isinstance(call_id, str) and call_id else new_id("toolu_"),
        "name": function["name"],
        "input": parse_tool_arguments(function.get("arguments")),
    }


def anthropic_usage(usage: Any) -> dict[str, int]:
    usage = as_object(usage)
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    return {
        "input_tokens": prompt if isinstance(prompt, int) else 0,
        "output_tokens": completion if isinstance(completion, int) else 0,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }


def translate_response(completion: Json, model: str, stop_sequences: Sequence[str] = ()) -> Json:
    """An OpenAI `chat.completion` as an Anthropic Message; `model` is the name the client used."""
    choices = completion.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise _bad_answer("the provider's answer has no choices")
    choice = choices[0]
    message = as_object(choice.get("message"))
    content: list[Json] = []
    text = _text_of(message.get("content"))
    if text:
        content.append({"type": "text", "text": text})
    refusal = message.get("refusal")
    if isinstance(refusal, str) and refusal:
        content.append({"type": "text", "text": refusal})
    calls: list[Any] = message.get("tool_calls") or []
    if not isinstance(calls, list):
        raise _bad_answer("the provider's tool_calls is not a list")
    if isinstance(message.get("function_call"), dict):  # the deprecated `functions` API
        calls = [*calls, {"function": message["function_call"]}]
    content.extend(_tool_use(call) for call in calls)
    stop_reason, stop_sequence = map_finish_reason(
        choice.get("finish_reason"), choice.get("stop_reason"), stop_sequences, bool(calls)
    )
    if isinstance(refusal, str) and refusal:
        stop_reason = "refusal"
    openai_id = completion.get("id")
    return {
        "id": f"msg_{openai_id}" if isinstance(openai_id, str) and openai_id else new_id("msg_"),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": anthropic_usage(completion.get("usage")),
    }


def parse_completion(
    raw: bytes, model: str, stop_sequences: Sequence[str] = ()
) -> ProviderResponse:
    """The provider's answer bytes as a `ProviderResponse` carrying an Anthropic Message."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ProviderError(502, "api_error", "the provider answered with invalid JSON",
                            retryable=True) from exc
    if not isinstance(data, dict):
        raise _bad_answer("the provider's answer is not a chat completion")
    message = translate_response(data, model, stop_sequences)
    return ProviderResponse(orjson.dumps(message), message["stop_reason"], message["usage"])


# --- errors -----------------------------------------------------------------------------------


def openai_error_type(status: int) -> str:
    if status == 529:
        return "overloaded_error"
    return "api_error" if status >= 500 else error_type_for_status(status)


def _error_message(raw: bytes) -> str | None:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict):
        return None
    error = data.get("error")
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])
    if isinstance(error, str):
        return error
    # vLLM and other FastAPI servers: {"message": ...} or {"detail": ...} at the top level
    for key in ("message", "detail"):
        if isinstance(data.get(key), str):
            return str(data[key])
    return None


def map_openai_error(status: int, body: bytes, retry_after: str | None,
                     headers: Headers = ()) -> ProviderError:
    """An OpenAI error answer as Anthropic's error type, keeping the provider's message."""
    message = _error_message(body)
    if message is None:
        message = f"provider answered HTTP {status}"
    # A spent quota answers 429 too, but no retry will refill it.
    retryable = False if _error_code(body) == "insufficient_quota" else None
    return ProviderError(status, openai_error_type(status), message,
                         retry_after=parse_retry_after(retry_after), retryable=retryable,
                         headers=headers)


def _error_code(body: bytes) -> str | None:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    error = data.get("error") if isinstance(data, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) else None
