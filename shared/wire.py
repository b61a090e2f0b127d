"""Anthropic Messages API models for where Ferry must understand a request: the translation to
OpenAI-compatible providers. Known fields are validated strictly (types, ranges, no typos
inside known objects), because what cannot be translated faithfully must be refused.

The front door does NOT use these: it checks only a request's outline (`api/validation.py`)
and forwards the body untouched, so a new Anthropic field never breaks a client. The error
envelope at the end of this module is Ferry's own, used everywhere.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)


class Strict(BaseModel):
    """A known object: strict types, unknown keys rejected (they are typos or unsupported)."""

    model_config = ConfigDict(strict=True, extra="forbid")


class Open(BaseModel):
    """An object whose unknown keys are kept and forwarded untouched."""

    model_config = ConfigDict(strict=True, extra="allow")


# --- content blocks -------------------------------------------------------------------------


class CacheControl(Strict):
    type: Literal["ephemeral"]
    ttl: Literal["5m", "1h"] | None = None


class TextBlock(Strict):
    type: Literal["text"]
    text: str
    cache_control: CacheControl | None = None
    citations: list[dict[str, Any]] | None = None


class Base64ImageSource(Strict):
    type: Literal["base64"]
    media_type: Literal["image/jpeg", "image/png", "image/gif", "image/webp"]
    data: str


class URLImageSource(Strict):
    type: Literal["url"]
    url: str


class FileImageSource(Strict):
    type: Literal["file"]
    file_id: str


ImageSource = Annotated[
    Base64ImageSource | URLImageSource | FileImageSource, Field(discriminator="type")
]


class ImageBlock(Strict):
    type: Literal["image"]
    source: ImageSource
    cache_control: CacheControl | None = None


class DocumentBlock(Strict):
    type: Literal["document"]
    # PDF (base64 / url / file), plain text or content sources: shapes vary, forwarded as given.
    source: dict[str, Any]
    title: str | None = None
    context: str | None = None
    citations: dict[str, Any] | None = None
    cache_control: CacheControl | None = None


class ToolUseBlock(Strict):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]
    cache_control: CacheControl | None = None


class ToolResultBlock(Strict):
    type: Literal["tool_result"]
    tool_use_id: str
    content: (
        str | list[Annotated[TextBlock | ImageBlock | DocumentBlock, Field(discriminator="type")]]
        | None
    ) = None
    is_error: bool | None = None
    cache_control: CacheControl | None = None


class ThinkingBlock(Strict):
    type: Literal["thinking"]
    thinking: str
    signature: str


class RedactedThinkingBlock(Strict):
    type: Literal["redacted_thinking"]
    data: str


class OtherBlock(Open):
    """A block type Ferry does not know (server-tool results and newer types): forwarded as is."""

    type: str


_KNOWN_BLOCKS = {
    "text", "image", "document", "tool_use", "tool_result", "thinking", "redacted_thinking",
}


def _block_tag(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    if kind is None:
        return "missing"
    return kind if kind in _KNOWN_BLOCKS else "other"


class _MissingType(Open):
    # Extra keys allowed: the only fault to report is the missing `type`, not the block's fields.
    type: str  # fails with "Field required" at `...type`


ContentBlock = Annotated[
    (Annotated[TextBlock, Tag("text")] |
    Annotated[ImageBlock, Tag("image")] |
    Annotated[DocumentBlock, Tag("document")] |
    Annotated[ToolUseBlock, Tag("tool_use")] |
    Annotated[ToolResultBlock, Tag("tool_result")] |
    Annotated[ThinkingBlock, Tag("thinking")] |
    Annotated[RedactedThinkingBlock, Tag("redacted_thinking")] |
    Annotated[OtherBlock, Tag("other")] |
    Annotated[_MissingType, Tag("missing")]),
    Discriminator(_block_tag),
]


class InputMessage(Strict):
    role: Literal["user", "assistant", "system"]
    content: str | list[ContentBlock]


# --- tools ----------------------------------------------------------------------------------


class CustomTool(Strict):
    type: Literal["custom"] | None = None
    name: Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,128}$")]
    description: str | None = None
    input_schema: dict[str, Any]
    cache_control: CacheControl | None = None

    @field_validator("input_schema")
    @classmethod
    def _schema_is_object(cls, value: dict[str, Any]) -> dict[str, Any]:
        if value.get("type") != "object":
            raise ValueError('must be a JSON Schema with "type": "object"')
        return value


class ServerTool(Open):
    """Anthropic-defined tools (web_search_…, bash_…, text_editor_…): forwarded as given."""

    type: str
    name: str


def _tool_tag(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return "custom" if kind in (None, "custom") else "server"


Tool = Annotated[
    Annotated[CustomTool, Tag("custom")] | Annotated[ServerTool, Tag("server")],
    Discriminator(_tool_tag),
]


class ToolChoiceAuto(Strict):
    type: Literal["auto"]
    disable_parallel_tool_use: bool | None = None


class ToolChoiceAny(Strict):
    type: Literal["any"]
    disable_parallel_tool_use: bool | None = None


class ToolChoiceNone(Strict):
    type: Literal["none"]


class ToolChoiceTool(Strict):
    type: Literal["tool"]
    name: str
    disable_parallel_tool_use: bool | None = None


ToolChoice = Annotated[
    ToolChoiceAuto | ToolChoiceAny | ToolChoiceNone | ToolChoiceTool,
    Field(discriminator="type"),
]


class ThinkingEnabled(Strict):
    type: Literal["enabled"]
    budget_tokens: Annotated[int, Field(ge=1024)]
    display: Literal["summarized", "omitted"] | None = None


class ThinkingAdaptive(Strict):
    type: Literal["adaptive"]
    display: Literal["summarized", "omitted"] | None = None


class ThinkingDisabled(Strict):
    type: Literal["disabled"]
    display: Literal["summarized", "omitted"] | None = None


Thinking = Annotated[ThinkingEnabled | ThinkingAdaptive | ThinkingDisabled,
                     Field(discriminator="type")]


class Metadata(Strict):
    user_id: str | None = None


# --- the request ----------------------------------------------------------------------------


class MessagesRequest(Open):
    model: Annotated[str, Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=0)]
    messages: Annotated[list[InputMessage], Field(min_length=1)]
    system: str | list[TextBlock] | None = None
    stream: bool | None = None
    temperature: Annotated[float, Field(ge=0, le=1)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    stop_sequences: list[str] | None = None
    metadata: Metadata | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None

    @model_validator(mode="after")
    def _budget_below_max_tokens(self) -> MessagesRequest:
        thinking = self.thinking
        if isinstance(thinking, ThinkingEnabled) and thinking.budget_tokens >= self.max_tokens:
            raise ValueError("thinking.budget_tokens must be less than max_tokens")
        return self

    def to_json(self) -> bytes:
        """Serialise for the upstream: what the client sent, without fields left unset."""
        return self.model_dump_json(exclude_unset=True).encode()


def parse_request(body: bytes) -> MessagesRequest:
    """Parse and validate a request body; raises ValidationError (pydantic) on any fault."""
    return MessagesRequest.model_validate_json(body)


def describe_validation_error(exc: ValidationError, body: bytes | None = None) -> str:
    """One line naming each bad field, e.g. `messages.0.role: Input should be 'user' or ...`.

    pydantic puts union-member tags into `loc` and reports every union branch that failed; the
    body (when given) lets us drop the tags and keep the branch the client evidently meant.
    """
    errors = exc.errors(include_url=False)
    if errors and errors[0]["type"] == "json_invalid":
        return f"request body is not valid JSON: {errors[0].get('ctx', {}).get('error', '')}"
    data: Any = None
    if body is not None:
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            data = None
    found: dict[tuple[Any, ...], list[str]] = {}
    for err in errors:
        loc = _field_path(err["loc"], data, err["type"] == "missing")
        msg = err["msg"].removeprefix("Value error, ")
        if msg not in found.setdefault(loc, []):
            found[loc].append(msg)
    # A failed union branch shows up as an error on a prefix of the real one: drop it.
    locs = [loc for loc in found if not any(o[: len(loc)] == loc and o != loc for o in found)]
    parts = []
    for loc in locs[:5]:
        where = ".".join(str(p) for p in loc)
        msg = ", or ".join(found[loc])
        if not where and msg == "Input should be an object":
            msg = "request body must be a JSON object (a Messages request)"
        parts.append(f"{where}: {msg}" if where else msg)
    if len(locs) > 5:
        parts.append(f"(and {len(locs) - 5} more)")
    return "; ".join(parts)


# Union-member names pydantic may put last in `loc` (a model-level check reported under its tag).
_TAGS = {"custom", "server", "other", "missing", "str", "int", "float", "bool"} | _KNOWN_BLOCKS


def _field_path(loc: tuple[Any, ...], data: Any, missing: bool) -> tuple[Any, ...]:
    """Walk `loc` along the input, skipping the union tags pydantic inserted."""
    out: list[Any] = []
    node = data
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(part, int):
            out.append(part)
            node = node[part] if isinstance(node, list) and -len(node) <= part < len(node) else None
        elif "[" in part:
            continue
        elif isinstance(node, dict) and not last and part == node.get("type"):
            continue  # the block's union tag, though it may also name a field (`text`, `thinking`)
        elif isinstance(node, dict) and part in node:
            out.append(part)
            node = node[part]
        elif node is not None and not last:
            continue  # a tag: the input has no such key here
        elif last and not missing and node is not None and (part in _TAGS or part[:1].isupper()):
            continue  # a model-level check reported under its union tag
        else:
            out.append(part)
            node = None
    return tuple(out)


# --- the response ---------------------------------------------------------------------------


class Usage(Open):
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None


class Message(Open):
    """A response Message. Lenient on purpose: Ferry relays what the provider produced."""

    model_config = ConfigDict(extra="allow")

    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[dict[str, Any]]
    stop_reason: str | None = None
    stop_sequence: str | None = None
    usage: Usage = Field(default_factory=Usage)


# --- errors ---------------------------------------------------------------------------------

ErrorType = Literal[
    "invalid_request_error",
    "authentication_error",
    "permission_error",
    "not_found_error",
    "request_too_large",
    "rate_limit_error",
    "api_error",
    "overloaded_error",
    "timeout_error",
]


def _printable(value: str) -> str:
    """A message may quote a client's bytes that were not UTF-8 (a header read with surrogate
    escapes): show them as escapes rather than fail the error answer itself."""
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


class ErrorDetail(BaseModel):
    type: str
    message: str

    @field_validator("message")
    @classmethod
    def _printable(cls, value: str) -> str:
        return _printable(value)


class ErrorEnvelope(BaseModel):
    type: Literal["error"] = "error"
    error: ErrorDetail
    request_id: str | None = None

    @classmethod
    def of(cls, error_type: str, message: str, request_id: str | None = None) -> ErrorEnvelope:
        return cls(error=ErrorDetail(type=error_type, message=message), request_id=request_id)

    def to_json(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()

    @staticmethod
    def dump(error_type: str, message: str, request_id: str | None = None) -> bytes:
        """`of(...).to_json()`, byte for byte, without building the models: the api answers
        every error with it, a 529 under overload among them, where the models were a tenth
        of the refusal's cost."""
        body: dict[str, Any] = {"type": "error",
                                "error": {"type": error_type, "message": _printable(message)}}
        if request_id is not None:
            body["request_id"] = request_id
        return orjson.dumps(body)


STATUS_ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    402: "billing_error",
    405: "invalid_request_error",
    408: "timeout_error",
    409: "conflict_error",
    413: "request_too_large",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "api_error",
    501: "api_error",
    503: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def error_type_for_status(status: int) -> str:
    if status in STATUS_ERROR_TYPES:
        return STATUS_ERROR_TYPES[status]
    return "invalid_request_error" if status < 500 else "api_error"
