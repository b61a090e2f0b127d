"""Anthropic's Message Batches API on Ferry's queue, driven with the official SDK unmodified:
create / retrieve / list / cancel / delete / results across two providers (Anthropic's API and
an OpenAI-compatible one, both the fake provider), errored, canceled and expired requests, and
the batch lane leaving single jobs and interactive requests their own slots."""

from __future__ import annotations

import asyncio
import gzip
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import anthropic
import asyncpg
import pytest
import pytest_asyncio
from anthropic.types.messages import MessageBatch

from tests.acceptance.interactive_support import providers_stack
from tests.acceptance.jobs import MODEL, submit, unique
from tests.acceptance.stack import Stack
from tests.conftest import TestRun

pytestmark = pytest.mark.acceptance

EXPIRY_S = 20  # FERRY_BATCH_EXPIRY for this module: the slow batch below outlives it
BATCH_CONCURRENCY = 2  # per worker: the lane's own budget


def providers_toml(stack: Stack) -> str:
    return f"""
[providers.openai]
type = "openai"
base_url = "{stack.fake_url}/v1"
keys = [{{ key = "sk-openai" }}]
"""


@pytest_asyncio.fixture(scope="module")
async def ferry(test_run: TestRun, tmp_path_factory: pytest.TempPathFactory
                ) -> AsyncIterator[Stack]:
    env = {"FERRY_BATCH_CONCURRENCY": str(BATCH_CONCURRENCY),
           "FERRY_BATCH_EXPIRY": str(EXPIRY_S), "FERRY_RECONCILE_INTERVAL": "0.5",
           "FERRY_PROVIDER_MAX_ATTEMPTS": "2", "FERRY_RETRY_BASE": "0.05"}
    async with providers_stack(test_run, tmp_path_factory.mktemp("ferry-batches"), "batches",
                               providers_toml, workers=1, env=env, sweeper=True) as stack:
        yield stack


@pytest_asyncio.fixture(scope="module")
async def client(ferry: Stack) -> AsyncIterator[anthropic.AsyncAnthropic]:
    sdk = ferry.client("batch-key-a")
    yield sdk
    await sdk.close()


def request(custom_id: str, text: str, model: str = MODEL, **params: Any) -> dict[str, Any]:
    return {"custom_id": custom_id,
            "params": {"model": model, "max_tokens": 64,
                       "messages": [{"role": "user", "content": text}], **params}}


async def ended(client: anthropic.AsyncAnthropic, batch_id: str,
                timeout: float = 60) -> MessageBatch:  # noqa: ASYNC109 -- a polling deadline
    deadline = time.monotonic() + timeout
    while True:
        batch = await client.messages.batches.retrieve(batch_id)
        counts = batch.request_counts
        assert (counts.processing + counts.succeeded + counts.errored + counts.canceled
                + counts.expired) == await _request_count(client, batch_id)
        if batch.processing_status == "ended":
            return batch
        assert time.monotonic() < deadline, f"{batch_id} still {batch.processing_status}"
        await asyncio.sleep(0.2)


_counts: dict[str, int] = {}


async def _request_count(client: anthropic.AsyncAnthropic, batch_id: str) -> int:
    return _counts[batch_id]


async def create(client: anthropic.AsyncAnthropic, requests: list[dict[str, Any]]
                 ) -> MessageBatch:
    batch = await client.messages.batches.create(requests=requests)  # type: ignore[arg-type]
    _counts[batch.id] = len(requests)
    return batch


async def results(client: anthropic.AsyncAnthropic, batch_id: str) -> dict[str, Any]:
    out = {}
    async for line in await client.messages.batches.results(batch_id):
        out[line.custom_id] = line.result
    return out


async def test_a_batch_across_two_providers_with_errored_requests(
        ferry: Stack, client: anthropic.AsyncAnthropic) -> None:
    tag = unique("b1")
    requests = [
        request("claude-1", f"one {tag}"),
        request("claude-2", f"two {tag}", system="be brief"),
        request("gpt-1", f"three {tag}", model="openai/gpt-4o"),
        request("gpt-2", f"four {tag}", model="openai/gpt-4o-mini"),
        request("refused", f"[[fake:status=403]] five {tag}"),
        request("no-provider", f"six {tag}", model="nowhere/model-x"),
        {"custom_id": "bad-params", "params": {"model": MODEL, "messages": []}},
    ]
    batch = await create(client, requests)
    assert batch.id.startswith("msgbatch_") and batch.type == "message_batch"
    assert batch.processing_status == "in_progress" and batch.results_url is None
    assert (batch.expires_at - batch.created_at).total_seconds() == pytest.approx(EXPIRY_S)

    done = await ended(client, batch.id)
    counts = done.request_counts
    assert (counts.succeeded, counts.errored, counts.canceled, counts.expired) == (4, 3, 0, 0)
    assert done.ended_at is not None and done.results_url == (
        f"{ferry.url}/anthropic/v1/messages/batches/{batch.id}/results")

    got = await results(client, batch.id)
    assert set(got) == {r["custom_id"] for r in requests}
    for custom_id, text in (("claude-1", "one"), ("claude-2", "two"), ("gpt-1", "three"),
                            ("gpt-2", "four")):
        assert got[custom_id].type == "succeeded"
        assert got[custom_id].message.content[0].text == f"echo: {text} {tag}"
    assert got["gpt-1"].message.model == "gpt-4o"  # answered through the OpenAI dialect
    assert got["refused"].type == "errored"
    assert got["refused"].error.error.type == "permission_error"
    assert got["no-provider"].error.error.type == "invalid_request_error"
    assert "nowhere" in got["no-provider"].error.error.message
    assert got["bad-params"].error.error.message == "max_tokens: Field required"


async def test_results_are_jsonl_in_request_order(ferry: Stack,
                                                  client: anthropic.AsyncAnthropic) -> None:
    batch = await create(client, [request(f"r{i}", unique(f"order {i}")) for i in range(30)])
    await ended(client, batch.id)
    async with aiohttp.ClientSession() as http, http.get(
            f"{ferry.url}/anthropic/v1/messages/batches/{batch.id}/results",
            headers={"x-api-key": "batch-key-a"}) as response:
        assert response.status == 200
        lines = (await response.read()).decode().splitlines()
    assert [json.loads(line)["custom_id"] for line in lines] == [f"r{i}" for i in range(30)]


async def test_slow_batch_leaves_single_jobs_their_lane_then_cancels(
        ferry: Stack, client: anthropic.AsyncAnthropic) -> None:
    count = 30
    batch = await create(client, [request(f"slow-{i}", unique(f"[[fake:delay=1]] s{i}"))
                                  for i in range(count)])
    await asyncio.sleep(1.0)  # the lane is busy: BATCH_CONCURRENCY requests at a time

    started = time.monotonic()
    job = await submit(client, unique("a single job"))
    raw = await client.messages.with_raw_response.create(
        model=MODEL, max_tokens=1, messages=[{"role": "user", "content": "poll"}],
        extra_headers={"x-bf-async-id": job.id, "x-ferry-wait": "30"})
    assert raw.headers["x-bf-async-status"] == "completed"
    single_s = time.monotonic() - started
    sync = await client.messages.create(model=MODEL, max_tokens=16,
                                        messages=[{"role": "user", "content": "quick"}])
    assert sync.content[0].text == "echo: quick"  # type: ignore[union-attr]
    during = await client.messages.batches.retrieve(batch.id)
    # Behind the batch in one queue, the job would have waited for most of it (count / 2 s).
    assert during.request_counts.processing >= count - 10, during.request_counts
    assert single_s < count / BATCH_CONCURRENCY / 2, single_s

    canceling = await client.messages.batches.cancel(batch.id)
    assert canceling.processing_status in ("canceling", "ended")
    assert canceling.cancel_initiated_at is not None
    done = await ended(client, batch.id)
    counts = done.request_counts
    assert counts.canceled >= count - 10 and counts.succeeded >= 1
    assert counts.succeeded + counts.canceled == count
    got = await results(client, batch.id)
    assert sorted(r.type for r in got.values()) == sorted(
        ["succeeded"] * counts.succeeded + ["canceled"] * counts.canceled)


async def test_requests_not_started_before_the_expiry_expire(
        client: anthropic.AsyncAnthropic) -> None:
    count = 48  # 24 s of work for the lane: more than EXPIRY_S
    batch = await create(client, [request(f"e{i}", unique(f"[[fake:delay=1]] e{i}"))
                                  for i in range(count)])
    done = await ended(client, batch.id, timeout=EXPIRY_S + 30)
    counts = done.request_counts
    assert counts.expired > 0 and counts.succeeded > 0
    assert counts.succeeded + counts.expired == count
    got = await results(client, batch.id)
    assert sum(r.type == "expired" for r in got.values()) == counts.expired


async def test_list_pages_newest_first_and_delete_once_ended(
        client: anthropic.AsyncAnthropic) -> None:
    async with anthropic.AsyncAnthropic(base_url=str(client.base_url), api_key="batch-key-b",
                                        max_retries=0) as own:
        made = [await create(own, [request("x", unique(f"list {i}"))]) for i in range(3)]
        page = await own.messages.batches.list(limit=2)
        assert [b.id for b in page.data] == [made[2].id, made[1].id] and page.has_more
        every = [b.id async for b in own.messages.batches.list(limit=2)]
        assert every == [b.id for b in reversed(made)]
        back = await own.messages.batches.list(limit=2, before_id=made[0].id)
        assert [b.id for b in back.data] == [made[2].id, made[1].id]

        slow = await create(own, [request("y", unique("[[fake:delay=3]] not yet"))])
        with pytest.raises(anthropic.BadRequestError, match="only an ended batch"):
            await own.messages.batches.delete(slow.id)
        await ended(own, made[0].id)
        deleted = await own.messages.batches.delete(made[0].id)
        assert (deleted.id, deleted.type) == (made[0].id, "message_batch_deleted")
        with pytest.raises(anthropic.NotFoundError):
            await own.messages.batches.retrieve(made[0].id)
        with pytest.raises(anthropic.NotFoundError):  # another key's batch is not there
            await client.messages.batches.retrieve(made[1].id)
        await own.messages.batches.cancel(slow.id)


@pytest.mark.parametrize(("requests", "message"), [
    ([], "requests: must contain at least one request"),
    ([request("same", "a"), request("same", "b")], "requests.1.custom_id: 'same' is used"),
    ([{"custom_id": "has space", "params": {}}], "requests.0.custom_id: must be"),
    ([{"custom_id": "x"}], "requests.0.params: Field required"),
])
async def test_a_malformed_create_is_a_400_and_creates_nothing(
        ferry: Stack, client: anthropic.AsyncAnthropic, requests: list[Any],
        message: str) -> None:
    before = await _batch_rows(ferry)
    with pytest.raises(anthropic.BadRequestError) as raised:
        await client.messages.batches.create(requests=requests)
    assert message in raised.value.body["error"]["message"]  # type: ignore[index]
    assert await _batch_rows(ferry) == before


async def test_a_gzip_create_body_is_read_as_it_arrives(
        ferry: Stack, client: anthropic.AsyncAnthropic) -> None:
    body = json.dumps({"requests": [request(f"z{i}", unique(f"zip {i}"))
                                    for i in range(200)]}).encode()
    async with aiohttp.ClientSession() as http, http.post(
            f"{ferry.url}/anthropic/v1/messages/batches", data=gzip.compress(body),
            headers={"x-api-key": "batch-key-a", "content-encoding": "gzip",
                     "content-type": "application/json"}) as response:
        created = await response.json()
        assert response.status == 200, created
    _counts[created["id"]] = 200
    done = await ended(client, created["id"])
    assert done.request_counts.succeeded == 200


async def _batch_rows(ferry: Stack) -> int:
    conn = await asyncpg.connect(ferry.database_url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM jobs WHERE mode = 'batch'"))
    finally:
        await conn.close()
