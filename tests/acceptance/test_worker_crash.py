"""A worker killed with SIGKILL in the middle of its jobs loses none of them, and leaves no
sync client waiting for an answer that will not come."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import anthropic
import pytest
import pytest_asyncio

from tests.acceptance.jobs import MODEL, job_row, result, submit, unique, user
from tests.acceptance.stack import Stack, running_stack
from tests.conftest import TestRun
from tests.support import eventually, fake_calls

pytestmark = pytest.mark.acceptance

DIRECTIVE = "[[fake:delay=1.5]]"


@pytest_asyncio.fixture(scope="module")
async def ferry(test_run: TestRun,
                tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    async with running_stack(test_run, tmp_path_factory.mktemp("ferry-crash"), "crash",
                             workers=1) as stack:
        yield stack


async def test_jobs_of_a_killed_worker_are_completed_by_the_next_one(ferry: Stack) -> None:
    texts = [unique(f"{DIRECTIVE} survivor {i}") for i in range(20)]
    async with ferry.client() as client:
        jobs = await asyncio.gather(*(submit(client, text) for text in texts))

        async def all_in_flight() -> bool:
            calls = [c for c in await fake_calls(ferry.fake_url) if c["text"] in texts]
            running = {c["text"] for c in calls if not c["finished"] and not c["cancelled"]}
            return running == set(texts)

        await eventually(all_in_flight, what="the worker to be calling the provider for all")
        ferry.kill("worker-1")

        for job in jobs:  # nothing finished: the kill came mid-call
            row = await job_row(ferry.database_url, job.id)
            assert row is not None
            assert (row["status"], row["deliveries"]) == ("processing", 1)

        ferry.start("worker-2", "worker")
        messages = await asyncio.gather(*(result(client, job.id) for job in jobs))

    for text, message in zip(texts, messages, strict=True):
        answer = "echo: " + text.replace(f"{DIRECTIVE} ", "")
        assert message.content[0].text == answer  # type: ignore[union-attr]
    for job in jobs:
        row = await job_row(ferry.database_url, job.id)
        assert row is not None
        assert (row["status"], row["deliveries"], row["attempts"]) == ("completed", 2, 1)
    for text in texts:  # one call abandoned by the dead worker, one answered
        calls = await fake_calls(ferry.fake_url, text)
        assert sorted((c["finished"], c["cancelled"]) for c in calls) == [
            (False, True), (True, False)]


async def test_a_sync_request_whose_worker_dies_gets_a_503_not_the_deadline(
        test_run: TestRun, tmp_path_factory: pytest.TempPathFactory) -> None:
    """The worker serving a sync request is killed mid-call. Its message may come back from the
    broker, or not (past the pickup timeout the broker drops it): either way the client hears
    a 503 once the worker's keepalives stop, not a 504 at the request deadline (120 s here;
    the SDK gives up at 60 s, so a gateway that waits for the deadline fails this test)."""
    async with running_stack(test_run, tmp_path_factory.mktemp("ferry-sync-crash"),
                             "crashsync", workers=1,
                             env={"FERRY_REQUEST_TIMEOUT": "120"}) as stack:
        text = unique("[[fake:delay=90]] orphaned")
        client = stack.client().with_options(timeout=60)
        call = asyncio.create_task(client.messages.create(
            model=MODEL, max_tokens=16, messages=user(text)))

        async def in_flight() -> bool:
            return any(not c["finished"] for c in await fake_calls(stack.fake_url, text))

        await eventually(in_flight, what="the worker to be calling the provider")
        await asyncio.sleep(1)  # its "started" is out (5 ms after it took the request)
        stack.kill("worker-1")
        with pytest.raises(anthropic.APIStatusError) as failure:
            await call
        assert failure.value.status_code == 503
        assert "stopped answering" in failure.value.message
        assert failure.value.body["error"]["type"] == "api_error"  # type: ignore[index]
