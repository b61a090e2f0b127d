"""Pacing to a provider's rate limit, end to end: the fake provider limits each key to 10
requests/s (a token bucket answering 429 with retry-after past it, Anthropic's headers on every
answer); two workers learn that from the headers and stay under it together. Without pacing
(FERRY_PACING=off), the same burst of jobs is mostly answered 429 on the first round."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import anthropic
import pytest
import pytest_asyncio

from tests.acceptance.jobs import MODEL, job_row, result, submit, unique, user
from tests.acceptance.stack import Stack, running_stack
from tests.conftest import TestRun
from tests.support import fake_calls

pytestmark = pytest.mark.acceptance

RPS = 10


@pytest_asyncio.fixture(scope="module")
async def ferry(test_run: TestRun,
                tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    async with running_stack(test_run, tmp_path_factory.mktemp("ferry-pacing"), "pacing",
                             workers=2, env={"FAKE_PROVIDER_RPS": str(RPS)}) as stack:
        yield stack


@pytest_asyncio.fixture(scope="module")
async def client(ferry: Stack) -> AsyncIterator[anthropic.AsyncAnthropic]:
    sdk = ferry.client("client-key-a").with_options(max_retries=0)
    yield sdk
    await sdk.close()


async def clear_calls(ferry: Stack) -> None:
    async with aiohttp.ClientSession() as http, http.delete(f"{ferry.fake_url}/_fake/calls"):
        pass


async def statuses(ferry: Stack) -> list[int]:
    """Every upstream call's status since clear_calls (a 429 is answered before the body is
    read, so it carries no prompt text to pick it out by)."""
    return [c["status"] for c in await fake_calls(ferry.fake_url)]


async def test_a_burst_of_jobs_stays_under_the_providers_limit(
    ferry: Stack, client: anthropic.AsyncAnthropic
) -> None:
    await clear_calls(ferry)
    texts = [unique(f"paced job {i}") for i in range(4 * RPS)]
    jobs = await asyncio.gather(*(submit(client, text) for text in texts))
    messages = await asyncio.gather(*(result(client, job.id, timeout=60) for job in jobs))
    assert [m.content[0].text for m in messages] == [  # type: ignore[union-attr]
        f"echo: {text}" for text in texts]
    seen = await statuses(ferry)
    # Unpaced, 2 workers would send all 40 at once into a bucket of 10: 30 429s at least.
    assert seen.count(429) <= 2, seen
    assert seen.count(200) == len(texts)
    for job in jobs:
        row = await job_row(ferry.database_url, job.id)
        assert row is not None
        assert (row["status"], row["attempts"]) == ("completed", 1)


async def test_sync_requests_wait_their_turn_rather_than_get_429(
    ferry: Stack, client: anthropic.AsyncAnthropic
) -> None:
    await clear_calls(ferry)
    texts = [unique(f"paced sync {i}") for i in range(2 * RPS)]
    messages = await asyncio.gather(*(
        client.messages.create(model=MODEL, max_tokens=32, messages=user(text))
        for text in texts))
    assert all(m.stop_reason == "end_turn" for m in messages)
    assert (await statuses(ferry)).count(429) <= 2


async def test_a_429_is_not_an_attempt(
    ferry: Stack, client: anthropic.AsyncAnthropic
) -> None:
    await clear_calls(ferry)
    text = unique("[[fake:fail_once=429,retry_after=1]] once more")
    job = await submit(client, text)
    message = await result(client, job.id, timeout=30)
    assert message.stop_reason == "end_turn"
    assert await statuses(ferry) == [429, 200]
    row = await job_row(ferry.database_url, job.id)
    assert row is not None
    assert (row["status"], row["attempts"], row["rate_limited"]) == ("completed", 1, 1)
