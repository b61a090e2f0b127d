"""Providers end to end: `provider/model` routing, translation to an OpenAI-compatible API,
retries, fallbacks and key rotation, in all three modes (sync, stream, async), through real
`ferry api` / `ferry worker` processes with a providers file and the fake provider."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import pytest
import pytest_asyncio
from anthropic.types import Message

from tests.acceptance.interactive_support import (
    SMALL_POOLS,
    Recorder,
    echo,
    history_rows,
    providers_stack,
    queue_depth,
    recording_proxy,
    unique_model,
)
from tests.acceptance.jobs import job_row, poll, result, submit, unique, user
from tests.acceptance.stack import Stack
from tests.conftest import TestRun
from tests.support import eventually, fake_calls

pytestmark = pytest.mark.acceptance

ANTHROPIC_PATH = "/v1/messages"
OPENAI_PATH = "/v1/chat/completions"
OPENAI_KEYS = ("sk-a", "sk-b")
MAX_ATTEMPTS = 4  # the default FERRY_PROVIDER_MAX_ATTEMPTS


def providers_toml(stack: Stack, recorder: Recorder) -> str:
    # `backup` reaches the fake through a recording proxy: the fake keeps no request bodies.
    recorder.upstream = stack.fake_url
    return f"""
[providers.openai]
type = "openai"
base_url = "{stack.fake_url}/v1"
keys = [{{ key = "sk-a", weight = 1 }}, {{ key = "sk-b", weight = 1 }}]

[providers.backup]
type = "anthropic"
base_url = "{recorder.url}"

[models.smart]
route = "backup/claude-smart"
fallbacks = ["openai/gpt-4o"]
"""


@pytest_asyncio.fixture(scope="module")
async def recorder() -> AsyncIterator[Recorder]:
    async with recording_proxy() as proxy:
        yield proxy


@pytest_asyncio.fixture(scope="module")
async def ferry(test_run: TestRun, tmp_path_factory: pytest.TempPathFactory,
                recorder: Recorder) -> AsyncIterator[Stack]:
    # One worker, so the key pool whose cool-down the key test watches is a single one.
    async with providers_stack(test_run, tmp_path_factory.mktemp("ferry-providers"),
                               "providers", lambda stack: providers_toml(stack, recorder),
                               workers=1,
                               env={**SMALL_POOLS, "FERRY_INLINE_RETRY_MAX": "0.5"}) as stack:
        yield stack


@pytest_asyncio.fixture(scope="module")
async def client(ferry: Stack) -> AsyncIterator[anthropic.AsyncAnthropic]:
    sdk = ferry.client()
    yield sdk
    await sdk.close()



async def create(client: anthropic.AsyncAnthropic, text: str, model: str,
                 **extra: Any) -> Message:
    return await client.messages.create(model=model, max_tokens=256, messages=user(text),
                                        **extra)


# (requested model, fake route, model the upstream saw, provider name)
ROUTES = [
    pytest.param("claude-x", ANTHROPIC_PATH, "claude-x", "anthropic", id="anthropic"),
    pytest.param("openai/gpt-4o", OPENAI_PATH, "gpt-4o", "openai", id="openai"),
    pytest.param("backup/claude-y", ANTHROPIC_PATH, "claude-y", "backup", id="backup"),
]


def assert_one_call(calls: list[dict[str, Any]], path: str, model: str,
                    stream: bool) -> dict[str, Any]:
    assert len(calls) == 1, calls
    call = calls[0]
    assert (call["path"], call["model"], call["stream"], call["status"]) == (
        path, model, stream, 200)
    if path == OPENAI_PATH:  # one of the pool's keys, as a bearer token
        assert call["headers"]["authorization"] in {f"Bearer {k}" for k in OPENAI_KEYS}
        assert "x-api-key" not in call["headers"]
    return call


# --- routing in the three modes ---------------------------------------------------------------


@pytest.mark.parametrize(("model", "path", "upstream", "provider"), ROUTES)
async def test_create_goes_to_the_models_provider(
    ferry: Stack, client: anthropic.AsyncAnthropic, model: str, path: str, upstream: str,
    provider: str
) -> None:
    text = unique("[[fake:tool=lookup]] route me")
    message = await create(client, text, model)
    assert [block.type for block in message.content] == ["text", "tool_use"]
    assert message.content[0].text == echo(text)  # type: ignore[union-attr]
    assert message.content[1].input == {  # type: ignore[union-attr]
        "query": echo(text).removeprefix("echo: "), "n": 1}
    assert message.stop_reason == "tool_use"
    assert_one_call(await fake_calls(ferry.fake_url, text), path, upstream, stream=False)


@pytest.mark.parametrize(("model", "path", "upstream", "provider"), ROUTES)
async def test_stream_goes_to_the_models_provider(
    ferry: Stack, client: anthropic.AsyncAnthropic, model: str, path: str, upstream: str,
    provider: str
) -> None:
    text = unique("[[fake:tool=lookup,chunks=3]] stream me")
    async with client.messages.stream(model=model, max_tokens=256,
                                      messages=user(text)) as stream:
        pieces = [piece async for piece in stream.text_stream]
        final = await stream.get_final_message()
    assert len(pieces) == 3 and "".join(pieces) == echo(text)
    assert [block.type for block in final.content] == ["text", "tool_use"]
    tool = final.content[1]
    assert tool.type == "tool_use" and tool.name == "lookup"
    assert tool.input == {"query": echo(text).removeprefix("echo: "), "n": 1}
    assert final.stop_reason == "tool_use"
    assert final.usage.output_tokens == len(echo(text).split()) + 10  # a tool call costs 10
    assert_one_call(await fake_calls(ferry.fake_url, text), path, upstream, stream=True)


@pytest.mark.parametrize(("model", "path", "upstream", "provider"), ROUTES)
async def test_async_jobs_go_to_the_models_provider(
    ferry: Stack, client: anthropic.AsyncAnthropic, model: str, path: str, upstream: str,
    provider: str
) -> None:
    text = unique("route me later")
    job = await submit_to(client, text, model)
    message = await result(client, job.id)
    assert message.content[0].text == echo(text)  # type: ignore[union-attr]
    assert_one_call(await fake_calls(ferry.fake_url, text), path, upstream, stream=False)
    row = await job_row(ferry.database_url, job.id)
    assert row is not None
    assert (row["model"], row["provider"], row["upstream_model"]) == (model, provider, upstream)
    assert (row["served_provider"], row["served_model"], row["attempts"]) == (
        provider, upstream, 1)


async def submit_to(client: anthropic.AsyncAnthropic, text: str, model: str,
                    extra_headers: dict[str, str] | None = None, **extra: Any) -> Message:
    return await client.messages.create(model=model, max_tokens=256, messages=user(text),
                                        extra_headers={"x-bf-async": "true",
                                                       **(extra_headers or {})}, **extra)


async def test_an_unknown_provider_is_a_bad_request_listing_the_configured_ones(
    ferry: Stack, client: anthropic.AsyncAnthropic
) -> None:
    text = unique("nobody serves this")
    with pytest.raises(anthropic.BadRequestError) as raised:
        await create(client, text, "mistral/large")
    assert raised.value.body["error"] == {  # type: ignore[index]
        "type": "invalid_request_error",
        "message": "model: provider 'mistral' is not configured; "
                   "configured providers: anthropic, backup, openai",
    }
    with pytest.raises(anthropic.BadRequestError) as raised:
        await submit_to(client, text, "claude-x",
                        extra_headers={"x-ferry-fallbacks": "mistral/large"})
    assert raised.value.body["error"]["message"].startswith(  # type: ignore[index]
        "x-ferry-fallbacks fallback 'mistral/large': provider 'mistral' is not configured")
    assert await fake_calls(ferry.fake_url, text) == []


# --- retries ----------------------------------------------------------------------------------


async def test_a_failed_first_attempt_is_retried(
    ferry: Stack, client: anthropic.AsyncAnthropic
) -> None:
    model = unique_model("claude-x")
    sync_text, async_text = unique("[[fake:fail_once=503]] again"), unique(
        "[[fake:fail_once=503]] again later")
    message = await create(client, sync_text, model)
    assert message.content[0].text == echo(sync_text)  # type: ignore[union-attr]
    job = await submit_to(client, async_text, model)
    assert (await result(client, job.id)).content[0].text == echo(async_text)  # type: ignore[union-attr]

    for text in (sync_text, async_text):
        calls = await fake_calls(ferry.fake_url, text)
        assert [c["status"] for c in calls] == [503, 200]
    row = await job_row(ferry.database_url, job.id)
    assert row is not None and (row["status"], row["attempts"]) == ("completed", 2)

    async def sync_row() -> list[Any]:
        return [r for r in await history_rows(ferry.database_url, model) if r["mode"] == "sync"]

    (history,) = await eventually(sync_row, timeout=10, what="the sync request's history row")
    assert (history["status"], history["attempts"]) == ("completed", 2)


async def test_a_rate_limit_is_retried_after_its_retry_after(
    ferry: Stack, client: anthropic.AsyncAnthropic
) -> None:
    # The anthropic provider has one key, so the retry waits for retry-after rather than
    # switching keys.
    text = unique("[[fake:fail_once=429,retry_after=1]] slow down")
    started = time.monotonic()
    message = await create(client, text, "claude-x")
    assert time.monotonic() - started >= 1.0  # a lower bound: retry-after was honoured
    assert message.content[0].text == echo(text)  # type: ignore[union-attr]
    assert [c["status"] for c in await fake_calls(ferry.fake_url, text)] == [429, 200]


# --- fallbacks --------------------------------------------------------------------------------


async def test_a_failing_primary_falls_back_in_sync_and_async(
    ferry: Stack, client: anthropic.AsyncAnthropic
) -> None:
    model = unique_model("claude-x")
    fallbacks = {"x-ferry-fallbacks": "openai/gpt-4o"}
    sync_text = unique(f"[[fake:status=503,fail_model={model}]] plan b")
    async_text = unique(f"[[fake:status=503,fail_model={model}]] plan b later")

    message = await create(client, sync_text, model, extra_headers=fallbacks)
    assert message.content[0].text == echo(sync_text)  # type: ignore[union-attr]
    job = await submit_to(client, async_text, model, extra_headers=fallbacks)
    assert (await result(client, job.id)).content[0].text == echo(async_text)  # type: ignore[union-attr]

    for text in (sync_text, async_text):
        calls = await fake_calls(ferry.fake_url, text)
        assert [(c["path"], c["model"], c["status"]) for c in calls] == (
            [(ANTHROPIC_PATH, model, 503)] * MAX_ATTEMPTS + [(OPENAI_PATH, "gpt-4o", 200)])
    row = await job_row(ferry.database_url, job.id)
    assert row is not None
    assert (row["status"], row["provider"], row["served_provider"], row["served_model"]) == (
        "completed", "anthropic", "openai", "gpt-4o")
    assert row["attempts"] == MAX_ATTEMPTS + 1

    async def sync_row() -> list[Any]:
        return [r for r in await history_rows(ferry.database_url, model) if r["mode"] == "sync"]

    (history,) = await eventually(sync_row, timeout=10, what="the sync request's history row")
    assert (history["status"], history["served_provider"], history["served_model"]) == (
        "completed", "openai", "gpt-4o")


async def test_anthropics_own_fallbacks_field_is_forwarded_untouched(
    ferry: Stack, client: anthropic.AsyncAnthropic, recorder: Recorder
) -> None:
    """`fallbacks` in the body is Anthropic's (a beta): Ferry's chain comes from the alias
    (`smart` -> backup/claude-smart, then openai/gpt-4o), the body reaches the upstream with
    only its model rewritten."""
    text = unique("[[fake:status=503,fail_model=claude-smart]] keep it")
    theirs = [{"model": "claude-haiku-4-5"}, "default"]
    message = await create(client, text, "smart",
                           extra_body={"fallbacks": theirs, "temperature": 0.5})
    assert message.content[0].text == echo(text)  # type: ignore[union-attr]
    bodies = recorder.for_text(text)
    assert len(bodies) == MAX_ATTEMPTS  # each attempt on the primary, as the upstream saw it
    for body in bodies:
        assert body == {"model": "claude-smart", "max_tokens": 256, "temperature": 0.5,
                        "fallbacks": theirs, "messages": [{"role": "user", "content": text}]}
    assert [c["path"] for c in await fake_calls(ferry.fake_url, text)] == (
        [ANTHROPIC_PATH] * MAX_ATTEMPTS + [OPENAI_PATH])


# --- keys -------------------------------------------------------------------------------------


async def test_a_rejected_key_cools_down_and_the_other_key_serves(
    ferry: Stack, client: anthropic.AsyncAnthropic
) -> None:
    directive = "[[fake:status=401,fail_key=sk-a]]"

    async def ask(n: int) -> tuple[str, list[dict[str, Any]]]:
        text = unique(f"{directive} key {n}")
        message = await create(client, text, "openai/gpt-4o")  # every request succeeds
        assert message.content[0].text == echo(text)  # type: ignore[union-attr]
        return text, await fake_calls(ferry.fake_url, text)

    def key(call: dict[str, Any]) -> str:
        return str(call["headers"]["authorization"]).removeprefix("Bearer ")

    # Keys are picked at random by weight: ask until sk-a has been tried once.
    before: list[list[dict[str, Any]]] = []
    for n in range(40):
        _, calls = await ask(n)
        before.append(calls)
        if any(key(c) == "sk-a" for c in calls):
            break
    tried = [c for calls in before for c in calls if key(c) == "sk-a"]
    assert len(tried) == 1, before  # sk-a was picked (1 in 2**40 that it never is)
    assert tried[0]["status"] == 401
    for calls in before:  # each request ended with one successful call on sk-b
        assert [(key(c), c["status"]) for c in calls][-1] == ("sk-b", 200)

    later = [calls for _, calls in [await ask(100 + n) for n in range(6)]]
    assert [[(key(c), c["status"]) for c in calls] for calls in later] == [[("sk-b", 200)]] * 6


# --- a delayed retry: SLOW (~10 s, the shortest delay tier) -----------------------------------


async def test_slow_a_long_retry_after_parks_the_async_job_in_the_delay_tier(
    ferry: Stack, client: anthropic.AsyncAnthropic
) -> None:
    """retry-after 2 s > FERRY_INLINE_RETRY_MAX 0.5 s: the job leaves the worker for the 10 s
    delay queue (shared/broker.py DELAY_TIERS_S), pending meanwhile, then completes."""
    text = unique("[[fake:fail_once=429,retry_after=2]] call me back")
    started = time.monotonic()
    job = await submit(client, text)

    async def parked() -> bool:
        calls = await fake_calls(ferry.fake_url, text)
        row = await job_row(ferry.database_url, job.id)
        return (len(calls) == 1 and calls[0]["status"] == 429 and row is not None
                and row["status"] == "pending" and row["deliveries"] == 1)

    await eventually(parked, timeout=10, what="the job to be parked after the 429")
    assert await queue_depth(ferry, "jobs.retry.10s") == 1
    status, _ = await poll(client, job.id)
    assert status == "pending"

    message = await result(client, job.id, timeout=40)
    assert time.monotonic() - started >= 10  # a lower bound: it waited out the delay tier
    assert message.content[0].text == echo(text)  # type: ignore[union-attr]
    assert [c["status"] for c in await fake_calls(ferry.fake_url, text)] == [429, 200]
    row = await job_row(ferry.database_url, job.id)
    assert row is not None
    # docs/reporting.md: attempts are the calls that count (a 429 does not: it is counted in
    # rate_limited)
    assert (row["status"], row["deliveries"], row["attempts"], row["rate_limited"]) == (
        "completed", 2, 1, 1)
