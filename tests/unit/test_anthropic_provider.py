"""The Anthropic provider adapter against the fake provider served on a real local port."""

from __future__ import annotations

import math
import socket
from typing import Any

import orjson
import pytest
import pytest_asyncio
from aiohttp import ClientSession

from worker.providers.anthropic import (
    AnthropicProvider,
    error_from_body,
    parse_message,
    parse_retry_after,
)
from worker.providers.base import CallContext, ProviderError, ProviderResponse

Json = dict[str, Any]

API_KEY = "sk-test"
DEFAULT_VERSION = "2023-06-01"


@pytest_asyncio.fixture(autouse=True)
async def clean(base_url: str, http: ClientSession) -> None:
    async with http.delete(f"{base_url}/_fake/calls") as resp:
        assert resp.status == 204


@pytest.fixture
def provider(http: ClientSession, base_url: str) -> AnthropicProvider:
    return AnthropicProvider(http, base_url, API_KEY, DEFAULT_VERSION, 5.0)


async def fake_calls(http: ClientSession, base_url: str) -> list[Json]:
    async with http.get(f"{base_url}/_fake/calls") as resp:
        calls: list[Json] = await resp.json()
        return calls


def body(text: str, **fields: Any) -> bytes:
    return orjson.dumps({
        "model": "claude-test", "max_tokens": 100,
        "messages": [{"role": "user", "content": text}], **fields,
    })


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# --- against the fake ----------------------------------------------------------------------------


async def test_success_returns_the_providers_message(provider: AnthropicProvider) -> None:
    result = await provider.create_message(body("hello there"), CallContext())
    message = orjson.loads(result.body)
    assert message["type"] == "message"
    assert message["model"] == "claude-test"
    assert message["content"] == [{"type": "text", "text": "echo: hello there"}]
    assert result.stop_reason == "end_turn" == message["stop_reason"]
    assert result.usage == {
        "input_tokens": 2, "output_tokens": 3,
        "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
    }


async def test_success_reports_max_tokens_stop(provider: AnthropicProvider) -> None:
    result = await provider.create_message(body("one two three four", max_tokens=2), CallContext())
    assert result.stop_reason == "max_tokens"
    assert result.usage["output_tokens"] == 2


async def test_request_body_reaches_the_provider(
    provider: AnthropicProvider, http: ClientSession, base_url: str
) -> None:
    await provider.create_message(body("forwarded text"), CallContext())
    [call] = await fake_calls(http, base_url)
    assert call["path"] == "/v1/messages"
    assert call["model"] == "claude-test"
    assert call["text"] == "forwarded text"


async def test_default_headers(
    provider: AnthropicProvider, http: ClientSession, base_url: str
) -> None:
    await provider.create_message(body("hi"), CallContext())
    [call] = await fake_calls(http, base_url)
    assert call["headers"] == {"x-api-key": API_KEY, "anthropic-version": DEFAULT_VERSION}


async def test_client_version_and_beta_are_forwarded(
    provider: AnthropicProvider, http: ClientSession, base_url: str
) -> None:
    ctx = CallContext(forward_headers=(
        ("anthropic-version", "2024-01-01"),
        ("anthropic-beta", "prompt-caching-2024-07-31,files-api-2025-04-14")))
    await provider.create_message(body("hi"), ctx)
    [call] = await fake_calls(http, base_url)
    assert call["headers"] == {
        "x-api-key": API_KEY,
        "anthropic-version": "2024-01-01",
        "anthropic-beta": "prompt-caching-2024-07-31,files-api-2025-04-14",
    }


async def test_no_api_key_sends_no_credential(
    http: ClientSession, base_url: str
) -> None:
    keyless = AnthropicProvider(http, base_url + "/", None, DEFAULT_VERSION, 5.0)
    await keyless.create_message(body("hi"), CallContext())
    [call] = await fake_calls(http, base_url)
    assert "x-api-key" not in call["headers"]
    assert "authorization" not in call["headers"]


async def test_400_is_not_retryable(provider: AnthropicProvider) -> None:
    with pytest.raises(ProviderError) as info:
        await provider.create_message(body("[[fake:status=400]] hi"), CallContext())
    err = info.value
    assert (err.status, err.error_type, err.message) == (
        400, "invalid_request_error", "fake provider failure 400",
    )
    assert err.retryable is False
    assert err.retry_after is None


async def test_400_relays_the_providers_own_message(provider: AnthropicProvider) -> None:
    with pytest.raises(ProviderError) as info:
        await provider.create_message(b'{"max_tokens": 5, "messages": []}', CallContext())
    assert (info.value.status, info.value.error_type, info.value.message) == (
        400, "invalid_request_error", "model: Field required",
    )
    assert info.value.retryable is False


async def test_401_is_not_retryable(provider: AnthropicProvider) -> None:
    with pytest.raises(ProviderError) as info:
        await provider.create_message(body("[[fake:status=401]] hi"), CallContext())
    assert (info.value.status, info.value.error_type) == (401, "authentication_error")
    assert info.value.retryable is False


async def test_429_with_retry_after(provider: AnthropicProvider) -> None:
    with pytest.raises(ProviderError) as info:
        await provider.create_message(body("[[fake:status=429,retry_after=3]] hi"), CallContext())
    err = info.value
    assert (err.status, err.error_type) == (429, "rate_limit_error")
    assert err.retryable is True
    assert err.retry_after == 3.0


async def test_529_is_retryable_overloaded(provider: AnthropicProvider) -> None:
    with pytest.raises(ProviderError) as info:
        await provider.create_message(body("[[fake:status=529]] hi"), CallContext())
    err = info.value
    assert (err.status, err.error_type, err.message) == (
        529, "overloaded_error", "fake provider failure 529",
    )
    assert err.retryable is True
    assert err.retry_after is None


async def test_500_is_retryable(provider: AnthropicProvider) -> None:
    with pytest.raises(ProviderError) as info:
        await provider.create_message(body("[[fake:status=500]] hi"), CallContext())
    assert (info.value.status, info.value.error_type, info.value.retryable) == (
        500, "api_error", True,
    )


async def test_timeout_is_a_retryable_504(
    http: ClientSession, base_url: str
) -> None:
    slow = AnthropicProvider(http, base_url, API_KEY, DEFAULT_VERSION, 0.3)
    with pytest.raises(ProviderError) as info:
        await slow.create_message(body("[[fake:delay=2]] hi"), CallContext())
    err = info.value
    assert (err.status, err.error_type, err.message) == (
        504, "timeout_error", "provider `anthropic` did not answer in time",
    )
    assert err.retryable is True


async def test_connection_refused_is_a_retryable_502(http: ClientSession) -> None:
    gone = AnthropicProvider(http, f"http://127.0.0.1:{unused_port()}", API_KEY,
                             DEFAULT_VERSION, 5.0)
    with pytest.raises(ProviderError) as info:
        await gone.create_message(body("hi"), CallContext())
    err = info.value
    assert (err.status, err.error_type) == (502, "api_error")
    # The cause's class, never the address or the library's text.
    assert err.message == "could not reach provider `anthropic` (ClientConnectorError)"
    assert "127.0.0.1" not in err.message
    assert err.retryable is True


# --- error_from_body -----------------------------------------------------------------------------


def envelope(error_type: Any, message: Any) -> bytes:
    return orjson.dumps({"type": "error", "error": {"type": error_type, "message": message}})


@pytest.mark.parametrize(("status", "raw", "retry_after", "expected"), [
    pytest.param(400, envelope("invalid_request_error", "max_tokens: too big"), None,
                 (400, "invalid_request_error", "max_tokens: too big", False, None),
                 id="envelope_400"),
    pytest.param(429, envelope("rate_limit_error", "slow down"), "7",
                 (429, "rate_limit_error", "slow down", True, 7.0), id="envelope_429"),
    # Anthropic sends retry-after with every rate limit: one without is a spend cap.
    pytest.param(429, envelope("rate_limit_error", "spend cap reached"), None,
                 (429, "rate_limit_error", "spend cap reached", False, None),
                 id="spend_cap_429_without_retry_after"),
    pytest.param(529, envelope("overloaded_error", "Overloaded"), None,
                 (529, "overloaded_error", "Overloaded", True, None), id="envelope_529"),
    pytest.param(400, envelope("some_new_error", "new"), None,
                 (400, "some_new_error", "new", False, None), id="unknown_type_kept"),
    pytest.param(500, b"<html>Server Error</html>", None,
                 (500, "api_error", "provider `anthropic` answered HTTP 500", True, None),
                 id="non_json_500_not_echoed"),
    pytest.param(502, b"", None,
                 (502, "api_error", "provider `anthropic` answered HTTP 502", True, None),
                 id="empty_502"),
    pytest.param(503, b"\xff\xfe upstream down", None,
                 (503, "api_error", "provider `anthropic` answered HTTP 503", True, None),
                 id="non_utf8"),
    pytest.param(404, b'{"error": "not found"}', None,
                 (404, "not_found_error", "provider `anthropic` answered HTTP 404", False, None),
                 id="error_is_a_string"),
    pytest.param(401, envelope(17, ["x"]), None,
                 (401, "authentication_error", "provider `anthropic` answered HTTP 401", False,
                  None), id="fields_of_wrong_type"),
    pytest.param(403, b"[1, 2]", None,
                 (403, "permission_error", "provider `anthropic` answered HTTP 403", False,
                  None), id="json_array"),
    pytest.param(418, b"null", None,
                 (418, "invalid_request_error", "provider `anthropic` answered HTTP 418", False,
                  None), id="json_null_unknown_4xx"),
    pytest.param(501, envelope(None, "not implemented"), None,
                 (501, "api_error", "not implemented", False, None), id="null_type_501"),
])
def test_error_from_body(status: int, raw: bytes, retry_after: str | None,
                         expected: tuple[int, str, str, bool, float | None]) -> None:
    headers = (("retry-after", retry_after),) if retry_after is not None else ()
    err = error_from_body(status, raw, headers)
    assert (err.status, err.error_type, err.message, err.retryable, err.retry_after) == expected


def test_an_anthropic_error_body_is_relayed_verbatim() -> None:
    raw = (b'{"type":"error","error":{"type":"invalid_request_error","message":"no"},'
           b'"request_id":"req_upstream_1"}')
    err = error_from_body(400, raw, (("request-id", "req_upstream_1"),))
    assert err.to_json() == raw
    assert err.headers == (("request-id", "req_upstream_1"),)


def test_a_body_that_is_not_an_envelope_gets_ferrys_own() -> None:
    err = error_from_body(502, b"<html>bad gateway</html>")
    assert orjson.loads(err.to_json()) == {
        "type": "error",
        "error": {"type": "api_error", "message": "provider `anthropic` answered HTTP 502"},
    }


def test_error_envelope_round_trips() -> None:
    err = error_from_body(529, envelope("overloaded_error", "Overloaded"))
    assert orjson.loads(err.envelope().to_json()) == {
        "type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"},
    }


# --- parse_retry_after ---------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [
    pytest.param(None, None, id="absent"),
    pytest.param("", None, id="empty"),
    pytest.param("3", 3.0, id="integer"),
    pytest.param("1.5", 1.5, id="fraction"),
    pytest.param(" 3 ", 3.0, id="padded"),
    pytest.param("0", 0.0, id="zero"),
    pytest.param("-5", 0.0, id="negative_clamped"),
    pytest.param("Wed, 21 Oct 2015 07:28:00 GMT", None, id="http_date"),
    pytest.param("soon", None, id="garbage"),
])
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value) == expected


def test_parse_retry_after_nan_is_not_kept() -> None:
    # nan would reach asyncio.sleep(nan) in the retry loop, which never returns.
    result = parse_retry_after("nan")
    assert result is None or math.isfinite(result)


# --- parse_message -------------------------------------------------------------------------------

MESSAGE: Json = {
    "id": "msg_01", "type": "message", "role": "assistant", "model": "claude-test",
    "content": [{"type": "text", "text": "Hi"}],
    "stop_reason": "end_turn", "stop_sequence": None,
    "usage": {"input_tokens": 10, "output_tokens": 5, "cache_creation_input_tokens": 0,
              "cache_read_input_tokens": None, "server_tool_use": {"web_search_requests": 1},
              "service_tier": "standard"},
}


def test_parse_message_keeps_the_raw_body() -> None:
    raw = orjson.dumps(MESSAGE)
    assert parse_message(raw) == ProviderResponse(
        body=raw,
        stop_reason="end_turn",
        usage={"input_tokens": 10, "output_tokens": 5, "cache_creation_input_tokens": 0},
    )


@pytest.mark.parametrize(("message", "stop_reason", "usage"), [
    pytest.param({**MESSAGE, "stop_reason": "tool_use"}, "tool_use",
                 {"input_tokens": 10, "output_tokens": 5, "cache_creation_input_tokens": 0},
                 id="tool_use"),
    pytest.param({k: v for k, v in MESSAGE.items() if k != "usage"}, "end_turn", {},
                 id="no_usage"),
    pytest.param({**MESSAGE, "usage": "lots"}, "end_turn", {}, id="usage_not_object"),
    pytest.param({**MESSAGE, "stop_reason": None}, None,
                 {"input_tokens": 10, "output_tokens": 5, "cache_creation_input_tokens": 0},
                 id="no_stop_reason"),
])
def test_parse_message_fields(message: Json, stop_reason: str | None,
                              usage: dict[str, int]) -> None:
    result = parse_message(orjson.dumps(message))
    assert (result.stop_reason, result.usage) == (stop_reason, usage)


@pytest.mark.parametrize(("raw", "retryable", "message"), [
    pytest.param(b"{not json", True, "provider `anthropic` answered with invalid JSON",
                 id="invalid_json"),
    pytest.param(b"", True, "provider `anthropic` answered with invalid JSON", id="empty"),
    pytest.param(envelope("overloaded_error", "Overloaded"), False,
                 "provider `anthropic`'s answer is not a Message", id="error_envelope_with_200"),
    pytest.param(b'{"id": "chatcmpl-1", "object": "chat.completion", "choices": []}', False,
                 "provider `anthropic`'s answer is not a Message", id="openai_shape"),
    pytest.param(b"[]", False, "provider `anthropic`'s answer is not a Message", id="json_array"),
    pytest.param(b'"message"', False, "provider `anthropic`'s answer is not a Message",
                 id="json_string"),
])
def test_parse_message_rejects(raw: bytes, retryable: bool, message: str) -> None:
    with pytest.raises(ProviderError) as info:
        parse_message(raw)
    err = info.value
    assert (err.status, err.error_type, err.message, err.retryable) == (
        502, "api_error", message, retryable,
    )
