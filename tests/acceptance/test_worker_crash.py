"""A worker killed with SIGKILL in the middle of its jobs loses none of them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from tests.acceptance.jobs import job_row, result, submit, unique
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
