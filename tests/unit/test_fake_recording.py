"""What the fake provider records of each call, byte for byte, and the headers it answers with."""

from __future__ import annotations

import asyncio
import base64
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest
import pytest_asyncio
from aiohttp import ClientSession
from aiohttp.test_utils import TestServer

from fakeprovider.server import create_app

Json = dict[str, Any]

ANTHROPIC_LIMIT_HEADERS = [
    f"anthropic-ratelimit-{kind}-{part}"
    for kind in ("requests", "tokens", "input-tokens", "output-tokens")
    for part in ("limit", "remaining", "reset")
]
OPENAI_LIMIT_HEADERS = [
    f"x-ratelimit-{part}-{kind}"
    for kind in ("requests", "tokens")
    for part in ("limit", "remaining", "reset")
]


@pytest_asyncio.fixture(autouse=True)
async def clean(base_url: str, http: ClientSession) -> None:
    async with http.delete(f"{base_url}/_fake/calls") as resp:
        assert resp.status == 204


async def calls(http: ClientSession, base_url: str) -> list[Json]:
    async with http.get(f"{base_url}/_fake/calls") as resp:
        result: list[Json] = await resp.json()
        return result


async def raw_exchange(base_url: str, request: bytes) -> tuple[bytes, dict[str, str], bytes]:
    """Send `request` as written on a new connection; (status line, headers, body) back."""
    url = urlsplit(base_url)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    try:
        writer.write(request)
        await writer.drain()
        response = await reader.read()  # `Connection: close`: the server ends it
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = response.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


async def test_the_exact_request_is_recorded(base_url: str, http: ClientSession) -> None:
    # Odd spacing, an escaped and a literal non-ASCII character, key order no parser keeps.
    body = (
        b'{"stream":false,  "model": "m","max_tokens":5,\n'
        b' "messages":[{"role":"user","content":"h\\u00e9llo \xe2\x9c\x93"}]}'
    )
    sent_headers = [
        (b"Host", b"fake.test"),
        (b"X-Api-Key", b"secret"),
        (b"Anthropic-Beta", b"b1"),
        (b"anthropic-beta", b"b2"),
        (b"X-Note", b"caf\xc3\xa9"),
        (b"Content-Type", b"application/json"),
        (b"Content-Length", str(len(body)).encode()),
        (b"Connection", b"close"),
    ]
    request = b"POST /v1/messages?beta=true&x=%20y HTTP/1.1\r\n"
    request += b"".join(name + b": " + value + b"\r\n" for name, value in sent_headers)
    status, headers, _ = await raw_exchange(base_url, request + b"\r\n" + body)
    assert status == b"HTTP/1.1 200 OK"

    [call] = await calls(http, base_url)
    assert base64.b64decode(call["body_b64"]) == body
    assert call["raw_headers"] == [
        [name.decode().lower(), value.decode("latin-1")] for name, value in sent_headers
    ]
    # Latin-1 keeps every byte: the UTF-8 the client sent comes back with one encode.
    assert call["raw_headers"][4][1].encode("latin-1") == "café".encode()
    assert (call["method"], call["path"], call["query"]) == (
        "POST",
        "/v1/messages",
        "beta=true&x=%20y",
    )
    assert call["request_id"] == headers["request-id"]
    # The older fields are all still there; `headers` keeps the first of repeated values.
    assert call["headers"] == {"x-api-key": "secret", "anthropic-beta": "b1"}
    assert (call["model"], call["text"], call["stream"]) == ("m", "héllo ✓", False)
    assert (call["status"], call["finished"], call["cancelled"]) == (200, True, False)
    assert call["id"].startswith("msg_fake_") and call["fault"] is None


async def test_an_empty_body_is_recorded_as_such(base_url: str, http: ClientSession) -> None:
    async with http.post(f"{base_url}/v1/chat/completions", data=b"") as resp:
        assert resp.status == 400
    [call] = await calls(http, base_url)
    assert (call["body_b64"], call["query"], call["method"], call["status"]) == (
        "",
        "",
        "POST",
        400,
    )


async def test_anthropic_answers_carry_request_id_and_rate_limit_headers(
    base_url: str, http: ClientSession
) -> None:
    url = f"{base_url}/v1/messages"
    good = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    requests: list[Json] = [
        good,
        {**good, "stream": True},
        {**good, "messages": [{"role": "user", "content": "x [[fake:status=503]]"}]},
        {"model": "m"},
    ]
    ids = []
    for body in requests:
        async with http.post(url, json=body) as resp:
            payload = await resp.read()
            request_id = resp.headers["request-id"]
            assert request_id.startswith("req_fake_")
            for name in ANTHROPIC_LIMIT_HEADERS:
                assert name in resp.headers, (resp.status, name)
            assert resp.headers["anthropic-ratelimit-requests-limit"] == "4000"
            assert resp.headers["anthropic-ratelimit-requests-remaining"] == "4000"
            reset = resp.headers["anthropic-ratelimit-output-tokens-reset"]
            assert reset.endswith("Z")
            assert datetime.fromisoformat(reset).tzinfo == UTC
            assert "x-request-id" not in resp.headers
            if resp.status >= 400:
                assert orjson.loads(payload)["request_id"] == request_id
            ids.append(request_id)
    assert len(set(ids)) == len(ids)
    assert [c["request_id"] for c in await calls(http, base_url)] == ids


async def test_openai_answers_carry_x_request_id_and_x_ratelimit_headers(
    base_url: str, http: ClientSession
) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "x [[fake:status=500]]"}]}
    async with http.post(f"{base_url}/v1/chat/completions", json=body) as resp:
        assert resp.status == 500
        error = await resp.json()
        headers = resp.headers
    assert headers["x-request-id"] == headers["request-id"]
    assert "request_id" not in error  # OpenAI's error body has none
    assert {name: headers[name] for name in OPENAI_LIMIT_HEADERS} == {
        "x-ratelimit-limit-requests": "4000",
        "x-ratelimit-remaining-requests": "4000",
        "x-ratelimit-reset-requests": "0s",
        "x-ratelimit-limit-tokens": "2400000",
        "x-ratelimit-remaining-tokens": "2400000",
        "x-ratelimit-reset-tokens": "0s",
    }
    assert not [name for name in headers if name.lower().startswith("anthropic-")]


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages/count_tokens"])
async def test_a_body_over_the_limit_gets_anthropics_413(path: str, http: ClientSession) -> None:
    async with TestServer(create_app(max_body=1000)) as server:
        body = orjson.dumps(
            {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x" * 2000}]}
        )
        async with http.post(server.make_url(path), data=body) as resp:
            assert resp.status == 413
            error = await resp.json()
            request_id = resp.headers["request-id"]
        async with http.get(server.make_url("/_fake/calls")) as resp:
            [call] = await resp.json()
    assert error == {
        "type": "error",
        "error": {"type": "request_too_large", "message": "request body too large"},
        "request_id": request_id,
    }
    assert (call["status"], call["body_b64"], call["path"]) == (413, "", path)
