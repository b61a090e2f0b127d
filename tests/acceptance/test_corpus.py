"""Every request shape of tests/corpus (today's Anthropic API, Claude Code's own requests, and
invented future fields at several depths) sent through Ferry sync, streamed and as an async
job: the client gets 200, and the provider receives the client's body byte for byte and every
`anthropic-*` header (repeated `anthropic-beta` headers merged), never the client's key.

With a `provider/model` prefix the body differs only in the top-level model's value."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from multidict import CIMultiDict

from tests.acceptance.stack import Stack, running_stack
from tests.conftest import TestRun
from tests.support import eventually, fake_calls

pytestmark = pytest.mark.acceptance

CORPUS = Path(__file__).resolve().parents[1] / "corpus"
SHAPES = sorted(CORPUS.glob("*.json"))
MESSAGES = [p for p in SHAPES if json.loads(p.read_text())["path"] == "/v1/messages"]
COUNTS = [p for p in SHAPES if p not in MESSAGES]
CLIENT_KEY = "client-key-corpus"


@pytest_asyncio.fixture(scope="module")
async def ferry(test_run: TestRun,
                tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    async with running_stack(test_run, tmp_path_factory.mktemp("ferry-corpus"), "corpus",
                             workers=2) as stack:
        yield stack


def load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def client_headers(shape: dict[str, Any], extra: dict[str, str]) -> CIMultiDict[str]:
    headers: CIMultiDict[str] = CIMultiDict({"x-api-key": CLIENT_KEY, **extra})
    for name, value in shape["headers"].items():
        if name.lower() == "accept-encoding":
            continue  # let aiohttp ask for what it can decode
        for item in value if isinstance(value, list) else [value]:
            headers.add(name, item)
    return headers


def expected_forwarded(shape: dict[str, Any]) -> dict[str, str]:
    """The `anthropic-*` headers the provider must see: betas merged in order, once each."""
    out: dict[str, list[str]] = {}
    for name, value in shape["headers"].items():
        lower = name.lower()
        if not lower.startswith("anthropic-"):
            continue
        for item in value if isinstance(value, list) else [value]:
            if lower == "anthropic-beta":
                for part in (p.strip() for p in item.split(",")):
                    if part and part not in out.setdefault(lower, []):
                        out[lower].append(part)
            else:
                out.setdefault(lower, []).append(item)
    return {n: ",".join(v) if n == "anthropic-beta" else ", ".join(v) for n, v in out.items()}


def received(call: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    body = base64.b64decode(call["body_b64"])
    headers: dict[str, str] = {}
    for name, value in call["raw_headers"]:
        assert name not in headers, f"the provider got {name} twice: {call['raw_headers']}"
        headers[name] = value
    return body, headers


def check_forwarded(call: dict[str, Any], sent: bytes, shape: dict[str, Any]) -> None:
    body, headers = received(call)
    assert body == sent, shape["name"]
    assert call["query"] == shape["query"]
    forwarded = {n: v for n, v in headers.items() if n.startswith("anthropic-")}
    expected = expected_forwarded(shape)
    expected.setdefault("anthropic-version", "2023-06-01")  # Ferry's default when absent
    assert forwarded == expected, shape["name"]
    assert headers["x-api-key"] != CLIENT_KEY  # the operator's key, never the client's
    assert "authorization" not in headers


async def one_new_call(stack: Stack, before: int) -> dict[str, Any]:
    calls = (await fake_calls(stack.fake_url))[before:]
    assert len(calls) == 1, calls
    return calls[0]


def url(stack: Stack, shape: dict[str, Any]) -> str:
    query = f"?{shape['query']}" if shape["query"] else ""
    return f"{stack.url}/anthropic{shape['path']}{query}"


@pytest.mark.parametrize("mode", ["sync", "stream", "async"])
@pytest.mark.parametrize("path", MESSAGES, ids=[p.stem for p in MESSAGES])
async def test_the_provider_receives_the_request_unchanged(ferry: Stack, path: Path,
                                                           mode: str) -> None:
    shape = load(path)
    body = {k: v for k, v in shape["body"].items() if k != "stream"}
    if mode == "stream":
        body["stream"] = True
    sent = json.dumps(body).encode()
    extra = {"x-bf-async": "true"} if mode == "async" else {}
    before = len(await fake_calls(ferry.fake_url))
    async with aiohttp.ClientSession() as http:
        async with http.post(url(ferry, shape), data=sent, headers=client_headers(shape, extra),
                             timeout=aiohttp.ClientTimeout(total=60)) as resp:
            status, text = resp.status, await resp.text()
        assert status == 200, f"{shape['name']}: HTTP {status}: {text[:2000]}"
        if mode == "stream":
            assert "event: message_stop" in text, text[-500:]
        if mode == "async":
            job_id = json.loads(text)["id"]
            await eventually(lambda: _completed(http, ferry, job_id),
                             what=f"job {job_id} of {shape['name']}")
    check_forwarded(await one_new_call(ferry, before), sent, shape)


async def _completed(http: aiohttp.ClientSession, stack: Stack, job_id: str) -> bool:
    async with http.post(f"{stack.url}/anthropic/v1/messages",
                         headers={"x-api-key": CLIENT_KEY, "x-bf-async-id": job_id}) as resp:
        assert resp.status == 200, await resp.text()
        return resp.headers["x-bf-async-status"] == "completed"


@pytest.mark.parametrize("path", COUNTS, ids=[p.stem for p in COUNTS])
async def test_count_tokens_is_forwarded_unchanged(ferry: Stack, path: Path) -> None:
    shape = load(path)
    sent = json.dumps(shape["body"]).encode()
    before = len(await fake_calls(ferry.fake_url))
    async with aiohttp.ClientSession() as http, http.post(
            url(ferry, shape), data=sent, headers=client_headers(shape, {}),
            timeout=aiohttp.ClientTimeout(total=60)) as resp:
        status, data = resp.status, await resp.json()
    assert status == 200, data
    assert isinstance(data["input_tokens"], int) and data["input_tokens"] > 0
    call = await one_new_call(ferry, before)
    assert call["path"] == "/v1/messages/count_tokens"
    check_forwarded(call, sent, shape)


@pytest.mark.parametrize("path", MESSAGES, ids=[p.stem for p in MESSAGES])
async def test_a_provider_prefix_changes_only_the_models_value(ferry: Stack,
                                                                path: Path) -> None:
    shape = load(path)
    model = shape["body"]["model"]
    body = {**shape["body"], "model": f"anthropic/{model}", "stream": False}
    sent = json.dumps(body).encode()
    before = len(await fake_calls(ferry.fake_url))
    async with aiohttp.ClientSession() as http, http.post(
            url(ferry, shape), data=sent, headers=client_headers(shape, {}),
            timeout=aiohttp.ClientTimeout(total=60)) as resp:
        assert resp.status == 200, await resp.text()
    body_received, _ = received(await one_new_call(ferry, before))
    assert body_received == sent.replace(json.dumps(f"anthropic/{model}").encode(),
                                         json.dumps(model).encode(), 1)


async def test_invented_future_fields_survive_at_every_depth(ferry: Stack) -> None:
    """Beyond the corpus: unknown keys in every object of a request, nested 6 deep."""
    marker = uuid.uuid4().hex

    def future(depth: int) -> dict[str, Any]:
        return {"x_future": marker} if depth == 0 else {"x_future": future(depth - 1)}

    body = {
        "model": "claude-ferry-test", "max_tokens": 16, "x_top": future(5),
        "messages": [{"role": "user", "x_msg": future(2), "content": [
            {"type": "text", "text": "hello", "x_block": future(3)},
            {"type": "x_block_type", "x_payload": [future(4), 1e308, -0.0]},
        ]}],
        "tools": [{"name": "t", "input_schema": {"type": "object", "x_schema": future(1)},
                   "x_tool": future(2)}],
    }
    sent = json.dumps(body).encode()
    before = len(await fake_calls(ferry.fake_url))
    async with aiohttp.ClientSession() as http, http.post(
            f"{ferry.url}/anthropic/v1/messages", data=sent,
            headers={"x-api-key": CLIENT_KEY, "content-type": "application/json"},
            timeout=aiohttp.ClientTimeout(total=60)) as resp:
        assert resp.status == 200, await resp.text()
    body_received, _ = received(await one_new_call(ferry, before))
    assert body_received == sent
