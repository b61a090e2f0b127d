"""What a client of async jobs and of a busy gateway can count on: idempotent submits, jobs
bound to a credential, early refusals under overload, and cancels that reach a request
before any worker started it. (The fault suite in tests/faults kills and stops processes.)"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import anthropic
import pytest
import pytest_asyncio

from tests.acceptance.interactive_support import queue_depth
from tests.acceptance.jobs import MODEL, job_row, result, submit, unique, user
from tests.acceptance.stack import Stack, running_stack
from tests.conftest import TestRun
from tests.support import eventually, fake_calls, request_body

pytestmark = pytest.mark.acceptance


@pytest_asyncio.fixture(scope="module")
async def ferry(test_run: TestRun, tmp_path_factory: pytest.TempPathFactory
                ) -> AsyncIterator[Stack]:
    # One worker with one interactive slot: easy to saturate on purpose.
    async with running_stack(test_run, tmp_path_factory.mktemp("ferry-durability"),
                             "durability", workers=1,
                             env={"FERRY_INTERACTIVE_CONCURRENCY": "1",
                                  "FERRY_ADMISSION_WAIT": "0.5"}) as stack:
        yield stack


@pytest_asyncio.fixture(scope="module")
async def client(ferry: Stack) -> AsyncIterator[anthropic.AsyncAnthropic]:
    sdk = ferry.client()
    yield sdk
    await sdk.close()


async def test_an_idempotent_submit_returns_the_same_job(
    ferry: Stack, client: anthropic.AsyncAnthropic
) -> None:
    text = unique("exactly once")
    key = {"Idempotency-Key": unique("key")}
    first = await submit(client, text, key)
    again = await submit(client, text, key)  # the client lost the first answer
    assert again.id == first.id
    await result(client, first.id)
    third = await submit(client, text, key)  # and after it completed
    assert third.id == first.id
    assert len(await fake_calls(ferry.fake_url, text)) == 1

    with pytest.raises(anthropic.ConflictError) as raised:
        await submit(client, unique("another body"), key)
    assert raised.value.body["error"]["type"] == "conflict_error"  # type: ignore[index]

    other = ferry.client("client-key-b")  # keys are per caller
    try:
        assert (await submit(other, text, key)).id != first.id
    finally:
        await other.close()


async def test_an_async_submit_needs_a_credential(ferry: Stack) -> None:
    # The SDK refuses to send an empty key; a plain HTTP client sends none.
    async with aiohttp.ClientSession() as http, http.post(
            f"{ferry.url}/anthropic/v1/messages", data=request_body(unique("whose is it")),
            headers={"content-type": "application/json", "x-bf-async": "true"}) as resp:
        data = await resp.json()
    assert (resp.status, data["error"]["type"]) == (401, "authentication_error")
    assert "bound to the credential" in data["error"]["message"]


async def test_requests_beyond_what_the_workers_can_start_are_refused_early(
    ferry: Stack, client: anthropic.AsyncAnthropic
) -> None:
    """One slot, busy for 3 s: the next requests queue; once the oldest has waited past
    FERRY_ADMISSION_WAIT, new ones get 529 at once instead of joining the queue."""
    busy = asyncio.create_task(client.messages.create(
        model=MODEL, max_tokens=16, messages=user(unique("[[fake:delay=3]] busy"))))
    await eventually(lambda: _started(ferry, "busy"), what="the slow request to start")
    attempts: list[asyncio.Task[anthropic.types.Message]] = []

    async def refused() -> anthropic.APIStatusError | None:
        attempts.append(asyncio.create_task(client.messages.create(
            model=MODEL, max_tokens=16, messages=user(unique("late")))))
        for task in attempts:
            if task.done() and isinstance(task.exception(), anthropic.APIStatusError):
                return task.exception()  # type: ignore[return-value]
        return None

    error = await eventually(refused, what="a request refused with 529", interval=0.1)
    assert error.status_code == 529
    assert error.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
    assert error.response.headers["retry-after"] == "1"
    # Every request was either admitted and answered, or refused with 529: none failed
    # otherwise, and the refused ones never reached the provider.
    outcomes = await asyncio.gather(busy, *attempts, return_exceptions=True)
    refusals = [o for o in outcomes if isinstance(o, BaseException)]
    assert all(isinstance(o, anthropic.APIStatusError) and o.status_code == 529
               for o in refusals), refusals
    answered = [o for o in outcomes if not isinstance(o, BaseException)]
    late_calls = [c for c in await fake_calls(ferry.fake_url) if "late" in (c["text"] or "")]
    assert len(late_calls) == len(answered) - 1  # all but `busy`


async def _queued(stack: Stack) -> bool:
    return await queue_depth(stack, "interactive") == 1


async def _started(stack: Stack, word: str) -> bool:
    return any(word in (c["text"] or "") and not c["finished"]
               for c in await fake_calls(stack.fake_url))


async def test_a_request_cancelled_before_a_worker_started_it_never_runs(
    ferry: Stack, client: anthropic.AsyncAnthropic
) -> None:
    busy = asyncio.create_task(client.messages.create(
        model=MODEL, max_tokens=16, messages=user(unique("[[fake:delay=2]] occupying"))))
    await eventually(lambda: _started(ferry, "occupying"), what="the slot to be taken")
    text = unique("never run me")
    waiting = asyncio.create_task(client.messages.create(model=MODEL, max_tokens=16,
                                                         messages=user(text)))
    # Published, and waiting: the worker's one slot is taken.
    await eventually(lambda: _queued(ferry), what="the request to wait in the queue")
    waiting.cancel()  # the client goes away: the api publishes a cancel
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await busy  # the slot frees up; the worker then picks up the cancelled request
    follow = unique("after the cancelled one")
    await client.messages.create(model=MODEL, max_tokens=16, messages=user(follow))
    assert await fake_calls(ferry.fake_url, text) == []
    assert len(await fake_calls(ferry.fake_url, follow)) == 1


async def test_a_job_row_records_its_request_id(ferry: Stack,
                                                client: anthropic.AsyncAnthropic) -> None:
    raw = await client.messages.with_raw_response.create(
        model=MODEL, max_tokens=16, messages=user(unique("traced")),
        extra_headers={"x-bf-async": "true"})
    job = await raw.parse()
    row = await job_row(ferry.database_url, job.id)
    assert row is not None and row["request_id"] == raw.headers["x-ferry-request-id"]
