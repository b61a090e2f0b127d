"""Hypothesis strategies for what a client can send Ferry's front door: request bodies (valid-ish
Messages requests mutated at any depth, arbitrary JSON, arbitrary bytes), header sets with any
bytes, methods and request targets, content encodings and chunked framing.

Bodies are written by `to_json`, which also writes what Python's encoders will not: numbers
beyond a 64-bit float or integer (`Raw`), lone surrogates (as `\\ud800` escapes, or as the
invalid UTF-8 bytes a careless client would send).
"""

from __future__ import annotations

import copy
import gzip
import json
import zlib
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import brotli
from hypothesis import strategies as st

from tests.acceptance.hostile_support import COUNT_TOKENS, MESSAGES


@dataclass(frozen=True)
class Raw:
    """A JSON token written exactly as given (a number no Python type holds, deep nesting)."""

    text: str


def to_json(value: Any, ascii_only: bool = True) -> bytes:
    text = _dump(value, ascii_only)
    return text.encode("utf-8", "surrogatepass")


def _dump(value: Any, ascii_only: bool) -> str:
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return "{" + ",".join(json.dumps(k, ensure_ascii=ascii_only) + ":" + _dump(v, ascii_only)
                              for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_dump(v, ascii_only) for v in value) + "]"
    return json.dumps(value, ensure_ascii=ascii_only)


def weighted(*options: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """Each strategy drawn in proportion to its weight (`one_of` gives each branch the same
    chance, and drops repeated branches)."""
    return st.sampled_from([s for weight, s in options for _ in range(weight)]).flatmap(
        lambda strategy: strategy)


# --- JSON values --------------------------------------------------------------------------------

RAW_TOKENS = st.sampled_from([
    "1e400", "-1e400", "1e-400", "-0", "0e0", "1E+999", "0.1e99999", "9" * 400, "-" + "9" * 5000,
    "123456789012345678901234567890", "1.0", "[" * 100 + "]" * 100, "[" * 5000 + "]" * 5000,
    '{"a":' * 600 + "1" + "}" * 600,
]).map(Raw)

SPECIAL_TEXT = st.sampled_from(["", "\x00", "a\x00b", "\u2028", "\U0001f680", "\ufeff", "\\",
                                '"', "\ud800", "\udfff", "a\udc80b", "\x7f", " " * 50])
SURROGATES = st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1,
                     max_size=3)
# Mostly ordinary text: a lone surrogate anywhere makes a whole body invalid, and the point is
# to reach every layer, not to be refused at the first.
TEXT = weighted((8, st.text(max_size=30)), (1, SPECIAL_TEXT), (1, SURROGATES)).filter(
    lambda t: "[[fake" not in t)
KEYS = st.sampled_from([
    "type", "text", "model", "messages", "role", "content", "stream", "max_tokens", "system",
    "tools", "id", "name", "input", "source", "cache_control", "tool_use_id", "thinking",
    "signature", "data", "media_type", "url", "metadata", "user_id", "tool_choice",
    "stop_sequences", "temperature", "top_p", "top_k", "input_schema", "budget_tokens",
]) | TEXT
SCALARS = (st.none() | st.booleans() | st.integers(-2**70, 2**70)
           | st.floats(allow_nan=False, allow_infinity=False) | TEXT | RAW_TOKENS)
JSON = st.recursive(SCALARS, lambda children: st.lists(children, max_size=4)
                    | st.dictionaries(KEYS, children, max_size=4), max_leaves=12)


# --- Messages requests, valid-ish -----------------------------------------------------------

MODELS = weighted(
    (8, st.sampled_from(["claude-fuzz", "openai/gpt-4o", "backup/claude-y", "m" * 512,
                         "openai//x"])),
    (1, st.sampled_from(["nope/x", "openai/", "/x", "", "OPENAI/x", "m" * 513,
                         "backup/" + "x" * 600, "a\x00"])),
    (1, TEXT))
ROLES = st.sampled_from(["user", "user", "assistant", "system"]) | TEXT
BLOCK_TYPES = st.sampled_from([
    "text", "text", "image", "document", "tool_use", "tool_result", "thinking",
    "redacted_thinking", "server_tool_use", "web_search_tool_result",
]) | TEXT
IMAGE_SOURCES = st.sampled_from([
    {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="},
    {"type": "url", "url": "https://example.com/a.png"}, {"type": "file", "file_id": "f"},
])
BLOCKS = st.fixed_dictionaries({"type": BLOCK_TYPES}, optional={
    "text": TEXT, "source": IMAGE_SOURCES | JSON, "id": TEXT, "name": TEXT, "input": JSON,
    "content": TEXT | st.lists(JSON, max_size=2), "tool_use_id": TEXT,
    "cache_control": st.just({"type": "ephemeral"}) | JSON, "thinking": TEXT, "signature": TEXT,
    "is_error": st.booleans(),
})
MESSAGE = st.fixed_dictionaries({"role": ROLES, "content": TEXT | st.lists(BLOCKS, max_size=3)})
TOOLS = st.lists(st.fixed_dictionaries(
    {"name": st.just("get_weather") | TEXT,
     "input_schema": st.just({"type": "object", "properties": {}}) | JSON},
    optional={"description": TEXT,
              "type": st.sampled_from(["custom", "web_search_20250305", "bash_20250124"])}),
    max_size=2)
REQUESTS = st.fixed_dictionaries(
    {"model": MODELS,
     "max_tokens": weighted((6, st.integers(1, 2048)), (1, st.sampled_from([0, -1, 2**64]))),
     "messages": st.lists(MESSAGE, min_size=1, max_size=3)},
    optional={
        "stream": st.booleans(), "system": TEXT | st.lists(BLOCKS, max_size=2),
        "temperature": st.floats(0, 1), "top_p": st.floats(0, 1), "top_k": st.integers(0, 500),
        "stop_sequences": st.lists(TEXT, max_size=2),
        "metadata": st.fixed_dictionaries({"user_id": TEXT}), "tools": TOOLS,
        "tool_choice": st.sampled_from([{"type": "auto"}, {"type": "any"}, {"type": "none"},
                                        {"type": "tool", "name": "get_weather"}]),
        "thinking": st.sampled_from([{"type": "disabled"}, {"type": "adaptive"},
                                     {"type": "enabled", "budget_tokens": 1024}]),
        "service_tier": TEXT,
    })


def _paths(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [path]
    if isinstance(value, dict):
        for key, child in value.items():
            out += _paths(child, (*path, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            out += _paths(child, (*path, index))
    return out


@st.composite
def mutated(draw: st.DrawFn, base: st.SearchStrategy[Any] = REQUESTS) -> Any:
    """`base`, then up to three mutations anywhere in it: a value replaced by any JSON, a key
    or element deleted, a key added, a value wrapped in an array or object."""
    value = copy.deepcopy(draw(base))
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 1, 1, 2, 3]))):
        # Deepest first: hypothesis favours early choices, and the outline (model,
        # max_tokens, roles) is what a mutation most often breaks.
        path = draw(st.sampled_from(_paths(value)[::-1]))
        operation = draw(st.sampled_from(["replace", "delete", "add", "wrap"]))
        node = value
        for part in path[:-1]:
            node = node[part]
        target = value if not path else node[path[-1]]
        if operation == "replace":
            new = draw(JSON)
        elif operation == "delete" and path:
            del node[path[-1]]
            continue
        elif operation == "add" and isinstance(target, dict):
            target[draw(KEYS)] = draw(JSON)
            continue
        else:
            new = [target] if draw(st.booleans()) else {draw(KEYS): target}
        if path:
            node[path[-1]] = new
        else:
            value = new
    return value


@dataclass(frozen=True)
class BodyCase:
    body: bytes
    path: str  # MESSAGES or COUNT_TOKENS
    is_async: bool


@st.composite
def body_cases(draw: st.DrawFn) -> BodyCase:
    kind = draw(st.sampled_from(["mutated"] * 6 + ["json", "bytes", "truncated"]))
    ascii_only = draw(st.sampled_from([True, True, True, False]))
    if kind == "mutated":
        body = to_json(draw(mutated()), ascii_only)
    elif kind == "json":
        body = to_json(draw(JSON), ascii_only)
    elif kind == "bytes":
        body = draw(st.binary(max_size=300))
    else:
        whole = to_json(draw(REQUESTS), ascii_only)
        body = whole[:draw(st.integers(0, max(0, len(whole) - 1)))]
    path = draw(st.sampled_from([MESSAGES] * 4 + [COUNT_TOKENS]))
    return BodyCase(body, path, path == MESSAGES and draw(st.integers(0, 3)) == 0)


# --- headers --------------------------------------------------------------------------------

# Framing and connection headers have a test of their own (`framings`).
FRAMING = {b"content-length", b"transfer-encoding", b"host", b"connection", b"upgrade",
           b"keep-alive", b"proxy-connection", b"http2-settings"}
HEADER_NAMES = st.sampled_from([
    b"x-api-key", b"authorization", b"anthropic-version", b"anthropic-beta", b"anthropic-foo",
    b"x-bf-async", b"x-bf-async-id", b"x-bf-async-job-result-ttl", b"idempotency-key",
    b"x-ferry-fallbacks", b"x-bf-async-webhook", b"content-type", b"content-encoding",
    b"accept", b"accept-encoding",
    b"user-agent", b"expect", b"cookie", b"x-forwarded-for", b"te", b"request-id",
    b"x-ferry-request-id", b"origin", b"range", b"X-Api-Key", b"X-BF-ASYNC",
]) | st.from_regex(rb"\A[!#$%&'*+.^_`|~0-9A-Za-z-]{1,40}\Z").filter(
    lambda name: name.lower() not in FRAMING)
HEADER_VALUES = st.sampled_from([
    b"true", b"false", b"TRUE", b" true ", b"1", b"0", b"", b"yes", b"job_" + b"0" * 32,
    b"job_zz", b"-1", b"99999999999999999999", b"3600", b"Bearer ", b"Bearer k", b"Basic a",
    b"gzip", b"br", b"identity", b"application/json", b"text/plain",
    b"multipart/form-data; boundary=x", b"application/x-www-form-urlencoded", b"100-continue",
    b"openai/gpt-4o", b"backup/x,openai/y", b"nope/x", b",,,", b"a,b,c,d,e,f,g",
    b"2023-06-01", b"tools-2024-04-04,prompt-caching-2024-07-31", b"v" * 9000,
]) | st.binary(max_size=120) | st.text(max_size=40).map(
    lambda t: t.encode("utf-8", "surrogatepass"))
HEADERS = st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES.filter(
    lambda v: b"\r" not in v and b"\n" not in v)), min_size=1, max_size=6)


# --- methods and request targets ---------------------------------------------------------------

KNOWN_METHODS = st.sampled_from([
    b"GET", b"GET", b"GET", b"HEAD", b"POST", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS",
    b"TRACE", b"PROPFIND", b"get", b"Post", b"M-SEARCH", b"LINK",
])
METHODS = weighted(
    (4, KNOWN_METHODS), (1, st.from_regex(rb"\A[A-Z]{1,12}\Z")),
    (1, st.binary(min_size=1, max_size=12).filter(lambda m: not any(c in m for c in b" \r\n"))))
PATHS = st.sampled_from([
    "/", "/healthz", "/readyz", "/metrics", MESSAGES, COUNT_TOKENS, "/anthropic/v1/models",
    "/anthropic/v1/models/claude-x", "/anthropic/v1/models/openai/gpt-4o", MESSAGES + "/",
    "//anthropic//v1//messages", "/anthropic/v1/../v1/messages", "/ANTHROPIC/V1/MESSAGES",
    "/v1/messages", "*", "http://127.0.0.1/anthropic/v1/models", "/%2e%2e/%2e%2e/etc/passwd",
    "/anthropic/v1/models/%00", "/anthropic/v1/models/%ff", "/anthropic/v1/models/" + "m" * 3000,
])
QUERIES = st.sampled_from([
    "", "", "?beta=true", "?limit=1", "?limit=0", "?limit=abc", "?after_id=x",
    "?before_id=x&after_id=y", "?", "?limit=99999999999999999999999",
]) | st.text(max_size=30).map(lambda t: "?" + quote(t, safe="=&"))


@st.composite
def targets(draw: st.DrawFn) -> bytes:
    path = draw(PATHS)
    suffix = draw(st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=12))
    if draw(st.integers(0, 3)) == 0:
        path += quote(suffix, safe="/%")
    target = path + draw(QUERIES)
    raw = target.encode()
    if draw(st.integers(0, 9)) == 0:  # bytes no client library would put in a URL
        raw += draw(st.binary(min_size=1, max_size=8).filter(
            lambda b: not any(c in b for c in b" \r\n")))
    return raw


# --- content encodings ----------------------------------------------------------------------

def _raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


ENCODE = {
    "identity": lambda data: data,
    "gzip": gzip.compress,
    "deflate": zlib.compress,
    "br": brotli.compress,
    "raw-deflate": _raw_deflate,
    "gzip-gzip": lambda data: gzip.compress(gzip.compress(data)),
}
# The Content-Encoding names that mean each encoding, as Ferry should read them.
NAMES = {"identity": ["identity", "", "IDENTITY"], "gzip": ["gzip", "x-gzip", "GZIP", " gzip "],
         "deflate": ["deflate", "Deflate"], "br": ["br", "BR"]}


@dataclass(frozen=True)
class EncodingCase:
    data: bytes
    header: bytes | None  # None: no Content-Encoding header at all
    intact: bool  # encoded correctly, named correctly, not damaged: must be answered 200


@st.composite
def encoding_cases(draw: st.DrawFn, body: bytes) -> EncodingCase:
    kind = draw(st.sampled_from(list(ENCODE)))
    padding = draw(st.sampled_from([0, 0, 0, 300_000]))
    plain = body[:-1] + b', "padding": "' + b"p" * padding + b'"}' if padding else body
    data = ENCODE[kind](plain)
    named = draw(st.sampled_from(NAMES.get(kind, ["deflate" if kind == "raw-deflate"
                                                  else "gzip"])))
    header_text = draw(weighted((4, st.just(named)), (1, st.sampled_from([
        "gzip", "deflate", "br", "identity", "compress", "zstd", "*", "gzip, identity",
        "identity, gzip", "gzip;q=1", "chunked"])), (1, st.from_regex(r"\A[a-z0-9-]{1,12}\Z"))))
    header: bytes | None = header_text.encode()
    if kind == "identity" and header_text == "" and draw(st.booleans()):
        header = None
    damage = draw(st.sampled_from([None, None, "truncate", "flip", "append", "empty"]))
    if damage == "truncate" and data:
        data = data[:draw(st.integers(0, len(data) - 1))]
    elif damage == "flip" and data:
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1:]
    elif damage == "append":
        data += draw(st.binary(min_size=1, max_size=20))
    elif damage == "empty":
        data = b""
    intact = (damage is None and kind in NAMES and header_text in NAMES[kind])
    return EncodingCase(data, header, intact)


# --- chunked framing ------------------------------------------------------------------------

FRAMING_FAULTS = [None] * 6 + ["bad-size", "negative-size", "size-overflow",
                  "missing-crlf", "long-data", "junk-after", "bare-lf", "space-in-size",
                  "space-before-extension",
                  "content-length-too", "chunked-twice", "chunked-not-last", "no-last-chunk"]


@dataclass(frozen=True)
class FramingCase:
    request: bytes
    fault: str | None


@st.composite
def framing_cases(draw: st.DrawFn, head: bytes, body: bytes) -> FramingCase:
    """`head`: request line and headers (no Transfer-Encoding, no final blank line)."""
    cuts = sorted(draw(st.lists(st.integers(1, max(1, len(body) - 1)), max_size=8, unique=True)))
    pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True) if b > a]
    upper = draw(st.booleans())
    extension = draw(st.sampled_from([b"", b"", b";ext=1", b';name="v"']))
    zeros = draw(st.sampled_from([b"", b"0", b"00"]))
    fault = draw(st.sampled_from(FRAMING_FAULTS))
    chunks = []
    for piece in pieces:
        size = (b"%X" if upper else b"%x") % len(piece)
        chunks.append(zeros + size + extension + b"\r\n" + piece + b"\r\n")
    last = b"0\r\n" + draw(st.sampled_from([b"", b"x-trailer: 1\r\n"])) + b"\r\n"
    te = b"Transfer-Encoding: chunked\r\n"
    if fault == "bad-size":
        chunks[0] = b"zz" + chunks[0]
    elif fault == "negative-size":
        chunks[0] = b"-" + chunks[0]
    elif fault == "size-overflow":
        chunks[0] = b"f" * 20 + chunks[0]
    elif fault == "missing-crlf":
        chunks[0] = chunks[0][:-2]
    elif fault == "long-data":
        chunks[0] = chunks[0][:-2] + b"extra\r\n"
    elif fault == "junk-after":
        last += b"GARBAGE / HTTP/1.1\r\n\r\n"
    elif fault == "bare-lf":
        chunks = [c.replace(b"\r\n", b"\n") for c in chunks]
    elif fault == "space-in-size":
        chunks[0] = b" " + chunks[0]
    elif fault == "space-before-extension":  # RFC 9112 allows it (BWS); llhttp refuses it
        chunks[0] = chunks[0].replace(b"\r\n", b" ;a=b\r\n", 1)
    elif fault == "content-length-too":
        te += b"Content-Length: %d\r\n" % len(body)
    elif fault == "chunked-twice":
        te += b"Transfer-Encoding: chunked\r\n"
    elif fault == "chunked-not-last":
        te = b"Transfer-Encoding: chunked, identity\r\n"
    elif fault == "no-last-chunk":
        last = b""
    return FramingCase(head + te + b"\r\n" + b"".join(chunks) + last, fault)
