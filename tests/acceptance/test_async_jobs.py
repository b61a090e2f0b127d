"""Async jobs end to end: fake provider, `ferry migrate`, `ferry api`, two `ferry worker`s,
driven with the official anthropic SDK."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import anthropic
import pytest
import pytest_asyncio

from tests.acceptance.jobs import (
    MODEL,
    job_row,
    poll,
    result,
    result_rows,
    submit,
    unique,
    user,
)
from tests.acceptance.stack import Stack, running_stack
from tests.conftest import TestRun
from tests.support import eventually, fake_calls

pytestmark = pytest.mark.acceptance


@pytest_asyncio.fixture(scope="module")
async def ferry(test_run: TestRun,
                tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    async with running_stack(test_run, tmp_path_factory.mktemp("ferry-jobs"), "jobs",
                             workers=2, env={"FERRY_PROVIDER_MAX_ATTEMPTS": "2"}) as stack:
        yield stack


@pytest_asyncio.fixture(scope="module")
async def client(ferry: Stack) -> AsyncIterator[anthropic.AsyncAnthropic]:
    sdk = ferry.client("client-key-a")
    yield sdk
    await sdk.close()


async def test_300_concurrent_jobs_each_get_their_own_answer(
    ferry: Stack, client: anthropic.AsyncAnthropic
) -> None:
    texts = [unique(f"job number {i}") for i in range(300)]
    slots = asyncio.Semaphore(50)

    async def one(text: str) -> tuple[str, str, str, anthropic.types.Message]:
        async with slots:
            job = await submit(client, text)
        assert job.content == [] and job.id.startswith("job_")
        while True:
            async with slots:
                status, message = await poll(client, job.id)
            if status == "completed":
                return text, job.id, status, message
            assert status in ("pending", "processing"), status
            await asyncio.sleep(0.1)

    done = await asyncio.wait_for(asyncio.gather(*(one(t) for t in texts)), timeout=90)
    assert len({job_id for _, job_id, _, _ in done}) == len(texts)
    for text, _, status, message in done:
        assert status == "completed"
        assert message.type == "message" and message.model == MODEL
        assert [block.type for block in message.content] == ["text"]
        assert message.content[0].text == f"echo: {text}"  # type: ignore[union-attr]
        assert message.stop_reason == "end_turn"


async def test_a_pending_job_answers_the_message_shape_without_content(
    ferry: Stack, client: anthropic.AsyncAnthropic
) -> None:
    text = unique("[[fake:delay=2]] take your time")
    raw = await client.messages.with_raw_response.create(
        model=MODEL, max_tokens=64, messages=user(text), extra_headers={"x-bf-async": "true"})
    assert raw.status_code == 200
    assert raw.headers["x-bf-async-status"] == "pending"
    job = await raw.parse()
    assert (job.content, job.model, job.stop_reason, job.role) == ([], MODEL, None, "assistant")

    status, pending = await poll(client, job.id)
    assert status in ("pending", "processing")
    assert (pending.id, pending.content, pending.model) == (job.id, [], MODEL)

    message = await result(client, job.id)
    assert message.id != job.id  # the provider's own message now
    assert message.content[0].text == "echo: " + text.replace("[[fake:delay=2]] ", "")  # type: ignore[union-attr]


async def test_an_unknown_job_id_is_not_found(client: anthropic.AsyncAnthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as raised:
        await poll(client, "job_" + "0" * 32)
    assert raised.value.status_code == 404
    assert raised.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    with pytest.raises(anthropic.NotFoundError):
        await poll(client, "msg_not_a_job")


async def test_another_keys_job_is_not_found(ferry: Stack,
                                             client: anthropic.AsyncAnthropic) -> None:
    job = await submit(client, unique("private"))
    async with ferry.client("client-key-b") as intruder:
        with pytest.raises(anthropic.NotFoundError):
            await poll(intruder, job.id)
    assert (await result(client, job.id)).content  # its owner still gets it


async def test_a_result_is_gone_after_its_ttl_before_any_sweep(
    ferry: Stack, client: anthropic.AsyncAnthropic
) -> None:
    text = unique("short lived")
    job = await submit(client, text, {"x-bf-async-job-result-ttl": "1"})
    message = await result(client, job.id)
    assert message.content[0].text == f"echo: {text}"  # type: ignore[union-attr]

    await asyncio.sleep(1.5)
    with pytest.raises(anthropic.NotFoundError):
        await poll(client, job.id)
    assert await result_rows(ferry.database_url, job.id) == 1  # expired, not yet deleted


async def test_stream_with_async_is_a_bad_request(client: anthropic.AsyncAnthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as raised:
        await client.messages.create(model=MODEL, max_tokens=64, messages=user("hi"),
                                     stream=True, extra_headers={"x-bf-async": "true"})
    assert raised.value.body["error"] == {  # type: ignore[index]
        "type": "invalid_request_error",
        "message": "streaming is not supported for async requests",
    }


async def test_an_upstream_permission_error_is_what_the_poll_raises(
    ferry: Stack, client: anthropic.AsyncAnthropic
) -> None:
    text = unique("[[fake:status=403]] forbidden")
    job = await submit(client, text)
    with pytest.raises(anthropic.PermissionDeniedError) as raised:
        await result(client, job.id)
    assert raised.value.response.headers["x-bf-async-status"] == "failed"
    assert raised.value.body["error"]["message"] == "fake provider failure 403"  # type: ignore[index]
    assert len(await fake_calls(ferry.fake_url, text)) == 1  # not retried


async def test_an_upstream_that_stays_overloaded_fails_after_its_attempts(
    ferry: Stack, client: anthropic.AsyncAnthropic
) -> None:
    text = unique("[[fake:status=529]] busy")
    job = await submit(client, text)
    with pytest.raises(anthropic.InternalServerError) as raised:
        await result(client, job.id)
    assert isinstance(raised.value, anthropic.OverloadedError)
    assert raised.value.status_code == 529
    assert raised.value.response.headers["x-bf-async-status"] == "failed"
    assert raised.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
    row = await job_row(ferry.database_url, job.id)
    assert row is not None
    assert (row["status"], row["http_status"], row["attempts"]) == ("failed", 529, 2)
    assert len(await fake_calls(ferry.fake_url, text)) == 2


async def test_the_sweeper_deletes_expired_results_and_keeps_the_history(
    ferry: Stack, client: anthropic.AsyncAnthropic
) -> None:
    job = await submit(client, unique("to be swept"), {"x-bf-async-job-result-ttl": "1"})
    await result(client, job.id)
    assert await result_rows(ferry.database_url, job.id) == 1

    ferry.start("sweeper", "sweeper", env=ferry.env(FERRY_SWEEP_INTERVAL="0.5"))
    try:
        await eventually(lambda: _gone(ferry, job.id), timeout=30,
                         what="the sweeper to delete the expired result")
    finally:
        code = ferry.stop("sweeper")
    assert code == 0  # SIGTERM is a clean stop
    row = await job_row(ferry.database_url, job.id)
    assert row is not None and row["status"] == "completed"


async def _gone(ferry: Stack, job_id: str) -> bool:
    return await result_rows(ferry.database_url, job_id) == 0


async def _wait_poll(client: anthropic.AsyncAnthropic, job_id: str,
                     wait: str) -> tuple[str, anthropic.types.Message, float, float]:
    """A long poll: (status, message, seconds it took, wall-clock time it was answered)."""
    started = time.monotonic()
    raw = await client.messages.with_raw_response.create(
        model=MODEL, max_tokens=1, messages=user("poll"),
        extra_headers={"x-bf-async-id": job_id, "x-ferry-wait": wait})
    answered = time.time()
    return (raw.headers["x-bf-async-status"], await raw.parse(), time.monotonic() - started,
            answered)


async def test_a_long_poll_answers_within_a_second_of_the_jobs_end(
    ferry: Stack, client: anthropic.AsyncAnthropic
) -> None:
    text = unique("[[fake:delay=1.5]] wait for me")
    job = await submit(client, text)
    status, message, took, answered = await _wait_poll(client, job.id, "30")
    assert status == "completed" and message.content and took < 30
    row = await job_row(ferry.database_url, job.id)
    assert row is not None and row["watched"]
    lag = answered - row["completed_at"].timestamp()
    assert 0 <= lag < 1.0, f"answered {lag:.3f} s after the job ended"


async def test_a_long_poll_honours_its_wait_and_answers_pending(
    client: anthropic.AsyncAnthropic
) -> None:
    job = await submit(client, unique("[[fake:delay=20]] slow"))
    status, message, took, _ = await _wait_poll(client, job.id, "1.5")
    assert status in ("pending", "processing") and message.content == []
    assert message.id == job.id
    assert 1.5 <= took < 10


async def test_a_long_poll_of_a_finished_job_answers_at_once(
    client: anthropic.AsyncAnthropic
) -> None:
    text = unique("already done")
    job = await submit(client, text)
    await result(client, job.id)
    status, message, took, _ = await _wait_poll(client, job.id, "60")
    assert status == "completed" and message.content[0].text == f"echo: {text}"  # type: ignore[union-attr]
    assert took < 10


@pytest.mark.parametrize("wait", ["61", "-1", "soon", "nan", "inf", "1e9", ""])
async def test_a_bad_wait_is_a_bad_request(client: anthropic.AsyncAnthropic,
                                           wait: str) -> None:
    job = await submit(client, unique("bad wait"))
    with pytest.raises(anthropic.BadRequestError) as raised:
        await _wait_poll(client, job.id, wait)
    error = raised.value.body["error"]  # type: ignore[index]
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith("x-ferry-wait must be a number of seconds from 0 to 60")
