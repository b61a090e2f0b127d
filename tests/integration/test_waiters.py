"""Long-poll waiters against the real PostgreSQL: woken by NOTIFY when their job ends, not by
re-reading it while they wait; a job nobody watches sends no notification; a lost LISTEN
connection is replaced and its waiters re-read their job."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable

import asyncpg
import pytest
import pytest_asyncio

from api.waiters import JobWaiters
from shared.settings import Settings
from shared.store import JOB_DONE_CHANNEL, JobView, Store
from tests.integration.conftest import CALLER
from tests.integration.test_store import LEASE, add_job, completed

pytestmark = pytest.mark.integration


class CountingStore(Store):
    """The real store, counting the job reads a waiter makes."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        super().__init__(pool)
        self.reads = 0

    async def get_job(self, job_id: uuid.UUID, caller_hash: bytes) -> JobView | None:
        self.reads += 1
        return await super().get_job(job_id, caller_hash)


@pytest_asyncio.fixture
async def counting(store: Store) -> CountingStore:
    return CountingStore(store._pool)


@pytest_asyncio.fixture
async def waiters(counting: CountingStore,
                  settings: Callable[..., Settings]) -> AsyncIterator[JobWaiters]:
    waiters = JobWaiters(counting, settings().database_url)
    async with waiters.running():
        assert await waiters.wait_listening(10)
        yield waiters


async def claimed_job(store: Store) -> uuid.UUID:
    job_id = await add_job(store)
    assert (await store.claim(job_id, "w1", LEASE)).state == "claimed"
    return job_id


async def test_a_waiter_is_woken_by_the_end_of_its_job_without_rereading(
        store: Store, counting: CountingStore, waiters: JobWaiters) -> None:
    job_id = await claimed_job(store)
    waiting = asyncio.create_task(waiters.wait(job_id, CALLER, 30))
    await asyncio.sleep(1.5)  # long enough for a polling loop to have read the job again
    assert not waiting.done()
    assert counting.reads == 1 and waiters.count == 1
    assert await store.finish(job_id, completed("done"))
    view = await asyncio.wait_for(waiting, 10)
    assert view is not None and view.status == "completed"
    assert counting.reads == 2  # the read after marking it watched, and the one after waking
    assert waiters.count == 0


async def test_the_wait_runs_out_with_the_job_as_it_is(
        store: Store, waiters: JobWaiters) -> None:
    job_id = await claimed_job(store)
    view = await waiters.wait(job_id, CALLER, 0.3)
    assert view is not None and view.status == "processing"
    assert waiters.count == 0


async def test_a_job_that_ended_before_the_watch_is_seen_at_once(
        store: Store, waiters: JobWaiters) -> None:
    job_id = await claimed_job(store)
    assert await store.finish(job_id, completed("early"))
    view = await asyncio.wait_for(waiters.wait(job_id, CALLER, 30), 5)
    assert view is not None and view.status == "completed"


async def test_many_waiters_on_one_job_all_wake(store: Store, waiters: JobWaiters) -> None:
    job_id = await claimed_job(store)
    polls = [asyncio.create_task(waiters.wait(job_id, CALLER, 30)) for _ in range(20)]
    await asyncio.sleep(0.5)
    assert await store.finish(job_id, completed("all"))
    views = await asyncio.wait_for(asyncio.gather(*polls), 10)
    assert {v.status for v in views if v is not None} == {"completed"} and None not in views


async def test_only_watched_jobs_notify(store: Store, db: asyncpg.Connection,
                                        settings: Callable[..., Settings]) -> None:
    heard: list[str] = []
    listener = await asyncpg.connect(settings().database_url)
    try:
        await listener.add_listener(JOB_DONE_CHANNEL, lambda *args: heard.append(args[3]))
        plain, watched = await claimed_job(store), await claimed_job(store)
        await store.watch(watched, CALLER)
        await store.watch(plain, b"someone else")  # not theirs: no effect
        assert await store.finish(plain, completed("a"))
        assert await store.finish(watched, completed("b"))
        await db.execute("SELECT 1")  # a round trip after the commits
        for _ in range(50):
            if heard:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        assert heard == [str(watched)]
    finally:
        await listener.close()


async def test_a_lost_listen_connection_is_replaced_and_waiters_reread(
        store: Store, db: asyncpg.Connection, waiters: JobWaiters) -> None:
    job_id = await claimed_job(store)
    waiting = asyncio.create_task(waiters.wait(job_id, CALLER, 30))
    await asyncio.sleep(0.3)
    killed = await db.fetchval(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
        " WHERE datname = current_database() AND query LIKE 'LISTEN%' AND pid <> pg_backend_pid()")
    assert killed >= 1
    # The job ends while the listener is away or reconnecting: nobody hears the notification.
    assert await store.finish(job_id, completed("while away"))
    view = await asyncio.wait_for(waiting, 10)
    assert view is not None and view.status == "completed"
    assert await waiters.wait_listening(10)
