"""Rate limiting like Anthropic's: buckets per API key, 429s, headers, `/_fake/config`, stats."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import anthropic
import pytest
import pytest_asyncio
from aiohttp import ClientSession
from aiohttp.test_utils import TestServer

from fakeprovider.ratelimit import (
    Allowance,
    ConfigError,
    Limiter,
    RateLimit,
    duration,
    rfc3339_after,
)
from fakeprovider.server import create_app
from tests.unit.test_fake_provider import user

Json = dict[str, Any]
# So slow that no token comes back during a test: counts are exact without any waiting.
CRAWL = 0.001


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# --- the bucket ---------------------------------------------------------------------------------


def test_bucket_spends_refuses_and_refills() -> None:
    clock = Clock()
    limiter = Limiter(RateLimit(rps=2, burst=3), clock)
    taken = [limiter.take("k") for _ in range(4)]
    assert [(a.allowed, a.remaining) for a in taken if a] == [
        (True, 2),
        (True, 1),
        (True, 0),
        (False, 0),
    ]
    refused = taken[3]
    assert refused is not None
    assert (refused.limit, refused.reset_after, refused.retry_after) == (3, 0.5, 1)
    assert taken[0] is not None and taken[0].reset_after == 0.5  # until full again
    clock.now += 0.25
    assert limiter.take("k") == Allowance(False, 2.0, 3, 0, 0.25)
    clock.now += 0.25
    allowed = limiter.take("k")
    assert allowed is not None and (allowed.allowed, allowed.remaining) == (True, 0)
    clock.now += 10
    peeked = limiter.peek("k")
    assert peeked is not None and (peeked.remaining, peeked.reset_after) == (3, 0.0)
    assert limiter.peek("k") == peeked  # peeking spends nothing


def test_each_key_has_its_own_bucket_and_rate() -> None:
    clock = Clock()
    limiter = Limiter(RateLimit(rps=None, keys={"slow": 0.5, "fast": 10}), clock)
    assert limiter.take("other") is None  # not limited at all
    slow = limiter.take("slow")
    assert slow is not None and (slow.allowed, slow.limit, slow.remaining) == (True, 1, 0)
    refused = limiter.take("slow")
    assert refused is not None and (refused.allowed, refused.retry_after) == (False, 2)
    fast = limiter.take("fast")
    assert fast is not None and (fast.limit, fast.remaining) == (10, 9)


def test_a_new_configuration_starts_with_full_buckets() -> None:
    limiter = Limiter(RateLimit(rps=1), Clock())
    assert limiter.take("k").allowed  # type: ignore[union-attr]
    assert not limiter.take("k").allowed  # type: ignore[union-attr]
    limiter.config = RateLimit(rps=1)
    assert limiter.take("k").allowed  # type: ignore[union-attr]
    limiter.config = None
    assert limiter.take("k") is None


def test_default_burst_is_the_rate_and_at_least_one() -> None:
    assert RateLimit(rps=40).bucket("k") == (40, 40)
    assert RateLimit(rps=2.5).bucket("k") == (2.5, 3)
    assert RateLimit(rps=0.1).bucket("k") == (0.1, 1)
    assert RateLimit(rps=5, burst=2, keys={"a": 1}).bucket("a") == (1, 2)


# --- configuration ------------------------------------------------------------------------------


def test_configuration_from_the_environment() -> None:
    assert RateLimit.from_env({}) is None
    assert RateLimit.from_env({"FAKE_PROVIDER_RPS": "40"}) == RateLimit(rps=40)
    env = {
        "FAKE_PROVIDER_RPS": "5",
        "FAKE_PROVIDER_BURST": "8",
        # Spaces and a trailing comma are forgiven; a key may end in base64 padding.
        "FAKE_PROVIDER_KEY_LIMITS": "key1=40, sk-ab===2 ,",
    }
    assert RateLimit.from_env(env) == RateLimit(rps=5, burst=8, keys={"key1": 40.0, "sk-ab==": 2.0})


@pytest.mark.parametrize(
    "env",
    [
        {"FAKE_PROVIDER_RPS": "fast"},
        {"FAKE_PROVIDER_RPS": "0"},
        {"FAKE_PROVIDER_RPS": "-1"},
        {"FAKE_PROVIDER_RPS": "inf"},
        {"FAKE_PROVIDER_RPS": "5", "FAKE_PROVIDER_BURST": "1.5"},
        {"FAKE_PROVIDER_RPS": "5", "FAKE_PROVIDER_BURST": "0"},
        {"FAKE_PROVIDER_BURST": "5"},
        {"FAKE_PROVIDER_KEY_LIMITS": "key1"},
        {"FAKE_PROVIDER_KEY_LIMITS": "=3"},
        {"FAKE_PROVIDER_KEY_LIMITS": "k=x"},
    ],
)
def test_malformed_environment_fails_loudly(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        RateLimit.from_env(env)


@pytest.mark.parametrize(
    "value",
    [
        [],
        {"rps": 0},
        {"rps": True},
        {"rps": "40"},
        {"rps": 4, "burst": 0},
        {"rps": 4, "burst": 2.5},
        {"rps": 4, "bucket": 4},
        {"keys": {"k": -1}},
        {"keys": ["k"]},
        {"burst": 3},
    ],
)
def test_malformed_json_configuration_is_refused(value: Any) -> None:
    with pytest.raises(ConfigError):
        RateLimit.from_json(value)


def test_time_spellings() -> None:
    now = datetime(2026, 5, 1, 12, 0, 0, 250_000, tzinfo=UTC)
    assert rfc3339_after(0, now) == "2026-05-01T12:00:01Z"  # rounded up
    assert rfc3339_after(59.75, now) == "2026-05-01T12:01:00Z"
    assert rfc3339_after(0, now.replace(microsecond=0)) == "2026-05-01T12:00:00Z"
    assert [duration(s) for s in (0, 0.0004, 0.25, 1.5, 60, 360.5)] == [
        "0s",
        "1ms",
        "250ms",
        "1.5s",
        "1m0s",
        "6m0.5s",
    ]


# --- over HTTP ----------------------------------------------------------------------------------


@pytest_asyncio.fixture
async def server() -> AsyncIterator[TestServer]:
    test_server = TestServer(create_app())
    await test_server.start_server()
    yield test_server
    await test_server.close()


async def configure(http: ClientSession, server: TestServer, config: Any) -> Json:
    async with http.post(server.make_url("/_fake/config"), json=config) as resp:
        assert resp.status == 200, await resp.text()
        result: Json = await resp.json()
        return result


async def ask(
    http: ClientSession, server: TestServer, key: str, path: str = "/v1/messages"
) -> tuple[int, Any, Any]:
    body = {"model": "m", "max_tokens": 5, "messages": user("hi")}
    async with http.post(server.make_url(path), json=body, headers={"x-api-key": key}) as resp:
        return resp.status, resp.headers, await resp.json()


async def test_over_the_limit_is_anthropics_429(http: ClientSession, server: TestServer) -> None:
    config = {"rate_limit": {"rps": CRAWL, "burst": 2}}
    assert await configure(http, server, config) == {
        "rate_limit": {"rps": CRAWL, "burst": 2, "keys": {}}
    }
    answers = [await ask(http, server, "k1") for _ in range(3)]
    assert [status for status, _, _ in answers] == [200, 200, 429]
    assert [h["anthropic-ratelimit-requests-remaining"] for _, h, _ in answers] == ["1", "0", "0"]
    # The limit is announced per minute, as Anthropic does (0.06 a minute shows as 1).
    assert {h["anthropic-ratelimit-requests-limit"] for _, h, _ in answers} == {"1"}
    _, headers, error = answers[2]
    assert error == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": error["error"]["message"]},
        "request_id": headers["request-id"],
    }
    assert "0.001 requests per second" in error["error"]["message"]
    # The next token is 1000 s away, less the moments the test took.
    retry_after = int(headers["retry-after"])
    assert 900 <= retry_after <= 1000
    reset = datetime.fromisoformat(headers["anthropic-ratelimit-requests-reset"])
    assert reset - datetime.now(UTC) > timedelta(seconds=900)
    assert "retry-after" not in answers[0][1]
    # Another key has its own bucket.
    assert (await ask(http, server, "k2"))[0] == 200


async def test_the_limit_is_announced_per_minute(http: ClientSession,
                                                 server: TestServer) -> None:
    await configure(http, server, {"rate_limit": {"rps": 40}})
    _, headers, _ = await ask(http, server, "k")
    assert headers["anthropic-ratelimit-requests-limit"] == "2400"
    assert headers["anthropic-ratelimit-requests-remaining"] == "39"  # the bucket holds 40
    _, headers, _ = await ask(http, server, "k", "/v1/chat/completions")
    assert headers["x-ratelimit-limit-requests"] == "2400"


async def test_per_key_limits_and_stats(http: ClientSession, server: TestServer) -> None:
    await configure(http, server, {"rate_limit": {"keys": {"slow": CRAWL}}})
    statuses = [(await ask(http, server, key))[0] for key in ("slow", "slow", "free", "free")]
    assert statuses == [200, 429, 200, 200]
    status, headers, _ = await ask(http, server, "free")
    assert headers["anthropic-ratelimit-requests-limit"] == "4000"  # not limited
    async with http.get(server.make_url("/_fake/calls")) as resp:
        recorded = [c["status"] for c in await resp.json()]
    assert recorded == [200, 429, 200, 200, 200]  # the 429 is a call like any other
    async with http.get(server.make_url("/_fake/stats")) as resp:
        stats = await resp.json()
    assert stats == {
        "calls": 5,
        "finished": 5,
        "cancelled": 0,
        "by_status": {"200": 4, "429": 1},
        "by_path": {"/v1/messages": 5},
        "by_key": {"slow": {"200": 1, "429": 1}, "free": {"200": 3}},
    }


async def test_config_turns_off_and_is_reported(http: ClientSession, server: TestServer) -> None:
    await configure(http, server, {"rate_limit": {"rps": CRAWL}})
    assert (await ask(http, server, "k"))[0] == 200
    assert (await ask(http, server, "k"))[0] == 429
    assert await configure(http, server, {}) == {"rate_limit": None}
    assert (await ask(http, server, "k"))[0] == 200
    await configure(http, server, {"rate_limit": {"rps": 7}})
    async with http.get(server.make_url("/_fake/config")) as resp:
        assert await resp.json() == {"rate_limit": {"rps": 7, "burst": None, "keys": {}}}
    assert await configure(http, server, {"rate_limit": None}) == {"rate_limit": None}


@pytest.mark.parametrize(
    "body", [b"nope", b"[]", b'{"rate_limits": null}', b'{"rate_limit": {"rps": -1}}']
)
async def test_bad_config_is_refused(http: ClientSession, server: TestServer, body: bytes) -> None:
    async with http.post(server.make_url("/_fake/config"), data=body) as resp:
        assert resp.status == 400
        assert "error" in await resp.json()
    async with http.get(server.make_url("/_fake/config")) as resp:
        assert await resp.json() == {"rate_limit": None}  # unchanged


async def test_openai_429(http: ClientSession, server: TestServer) -> None:
    await configure(http, server, {"rate_limit": {"rps": CRAWL, "burst": 1}})
    path = "/v1/chat/completions"
    status, headers, _ = await ask(http, server, "k", path)
    assert (status, headers["x-ratelimit-remaining-requests"]) == (200, "0")
    assert headers["x-ratelimit-reset-requests"] == "16m40s"
    status, headers, error = await ask(http, server, "k", path)
    assert status == 429
    assert (error["error"]["type"], error["error"]["code"]) == ("requests", "rate_limit_exceeded")
    assert 900 <= int(headers["retry-after"]) <= 1000
    assert (headers["x-ratelimit-limit-requests"], headers["x-ratelimit-remaining-requests"]) == (
        "1",
        "0",
    )


async def test_bearer_keys_and_count_tokens_share_the_bucket(
    http: ClientSession, server: TestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)  # the SDK would send it as x-api-key
    await configure(http, server, {"rate_limit": {"rps": CRAWL, "burst": 1}})
    body = {"model": "m", "messages": user("hi")}
    url = server.make_url("/v1/messages/count_tokens")
    async with http.post(url, json=body, headers={"authorization": "Bearer b"}) as resp:
        assert resp.status == 200
    async with anthropic.AsyncAnthropic(
        base_url=str(server.make_url("")), auth_token="b", max_retries=0
    ) as sdk:
        with pytest.raises(anthropic.RateLimitError) as raised:
            await sdk.messages.create(model="m", max_tokens=5, messages=user("hi"))
    assert raised.value.response.headers["anthropic-ratelimit-requests-remaining"] == "0"
    # Model listing is never limited, but shows the bucket.
    async with http.get(server.make_url("/v1/models"), headers={"x-api-key": "b"}) as resp:
        assert resp.status == 200
        assert resp.headers["anthropic-ratelimit-requests-remaining"] == "0"


async def test_the_command_reads_the_environment(http: ClientSession) -> None:
    env = {"FAKE_PROVIDER_RPS": str(CRAWL), "FAKE_PROVIDER_BURST": "1"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fakeprovider",
        "--port",
        "0",
        stdout=asyncio.subprocess.PIPE,
        env={**_base_env(), **env},
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), timeout=30)).decode()
        url = line.split()[-1]
        body = {"model": "m", "max_tokens": 5, "messages": user("hi")}
        statuses = []
        for _ in range(2):
            async with http.post(f"{url}/v1/messages", json=body) as resp:
                statuses.append(resp.status)
        assert statuses == [200, 429]
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), timeout=30) == 0


async def test_the_command_refuses_a_malformed_environment() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fakeprovider",
        "--port",
        "0",
        stderr=asyncio.subprocess.PIPE,
        env={**_base_env(), "FAKE_PROVIDER_RPS": "lots"},
    )
    _, stderr = await proc.communicate()
    assert proc.returncode != 0
    assert b"FAKE_PROVIDER_RPS" in stderr


def _base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("FAKE_PROVIDER_")}
