"""In-process Ferry pieces wired to the real PostgreSQL and RabbitMQ of the test run."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aio_pika
import aiohttp
import asyncpg
import pytest_asyncio
from aio_pika.abc import AbstractQueue
from pydantic import SecretStr

from shared.broker import Broker
from shared.jobs import JobEnvelope, caller_hash, new_job_id
from shared.providers import load_providers
from shared.settings import Settings
from shared.store import Claim, JobView, NewJob, Store
from tests.support import MODEL, eventually, request_body
from worker.main import build_providers
from worker.worker import Worker

CALLER = caller_hash("key-a", None)
UPSTREAM_KEY = "sk-upstream-test"


@pytest_asyncio.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain connection for looking at rows directly."""
    conn = await asyncpg.connect(database_url)
    yield conn
    await conn.close()


@pytest_asyncio.fixture
async def store(settings: Callable[..., Settings]) -> AsyncIterator[Store]:
    store = await Store.connect(settings().database_url, min_size=1, max_size=5)
    yield store
    await store.close()


@pytest_asyncio.fixture
async def broker(settings: Callable[..., Settings]) -> AsyncIterator[Broker]:
    broker = await Broker.connect(settings())
    yield broker
    await broker.close()


@pytest_asyncio.fixture
async def dead_letters(settings: Callable[..., Settings],
                       broker: Broker) -> AsyncIterator[AbstractQueue]:
    """The dead-letter queue of this test's namespace, read on a connection of its own."""
    connection = await aio_pika.connect(settings().amqp_url)
    try:
        channel = await connection.channel()
        yield await channel.declare_queue(settings().dead_letter_queue, passive=True)
    finally:
        await connection.close()


async def submit(store: Store, broker: Broker, text: str, *, ttl: int = 3600,
                 caller: bytes = CALLER, publish: bool = True) -> JobEnvelope:
    """What the api does on submit: commit the job and its message, publish, mark it."""
    job_id = new_job_id()
    envelope = JobEnvelope(job_id=job_id, model=MODEL, body=request_body(text))
    job = NewJob(id=job_id, caller_hash=caller, mode="async", model=MODEL, provider="anthropic",
                 ttl_seconds=ttl, message=envelope.encode(), upstream_model=MODEL)
    assert await store.insert_jobs([job]) == [None]
    if publish:
        await broker.publish_job(envelope)
        await store.mark_published([job_id])
    return envelope


async def finished(store: Store, job_id: uuid.UUID, caller: bytes = CALLER) -> JobView:
    async def probe() -> JobView | None:
        view = await store.get_job(job_id, caller)
        return view if view is not None and view.status in ("completed", "failed") else None

    return await eventually(probe, what=f"job {job_id} to finish")


class ObservedStore(Store):
    """The real store, remembering what each claim answered."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        super().__init__(pool)
        self.claims: list[tuple[uuid.UUID, Claim]] = []
        self.claim_batches: list[int] = []  # how many jobs each claim statement took

    async def claim_jobs(self, job_ids: list[uuid.UUID], worker_id: str,
                         lease_s: float) -> list[Claim]:
        results = await super().claim_jobs(job_ids, worker_id, lease_s)
        self.claim_batches.append(len(job_ids))
        self.claims.extend(zip(job_ids, results, strict=True))
        return results


@dataclass
class RunningWorker:
    worker: Worker
    store: ObservedStore
    broker: Broker
    session: aiohttp.ClientSession
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    closed: bool = False

    async def shutdown(self) -> None:
        """What SIGTERM does: stop taking work, wait the grace period, hand back the rest."""
        if self.closed:
            return
        self.closed = True
        self.stop.set()
        try:
            assert self.task is not None
            await asyncio.wait_for(self.task, timeout=30)
        finally:
            await self.session.close()
            await self.broker.close()
            await self.store.close()


@pytest_asyncio.fixture
async def start_worker(
    fake_provider: str, namespace: str,  # the namespace outlives the workers using it
) -> AsyncIterator[Callable[[Settings], Awaitable[RunningWorker]]]:
    """`await start_worker(settings)`: a Worker with the real store and broker and the
    Anthropic provider pointed at the in-process fake, running until the test stops it."""
    running: list[RunningWorker] = []
    numbers = itertools.count(1)

    async def start(settings: Settings,
                    store_class: type[ObservedStore] = ObservedStore) -> RunningWorker:
        # The production wiring (providers from settings), with the upstream being the fake.
        settings = settings.model_copy(update={
            "anthropic_base_url": fake_provider, "anthropic_api_key": SecretStr(UPSTREAM_KEY),
        })
        pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=5)
        store = store_class(pool)
        broker = await Broker.connect(settings)
        session = aiohttp.ClientSession()
        providers = build_providers(settings, load_providers(settings), session,
                                    environ={"ANTHROPIC_API_KEY": UPSTREAM_KEY})
        worker = Worker(settings, store, broker, providers,
                        worker_id=f"test-worker-{next(numbers)}")
        handle = RunningWorker(worker, store, broker, session)
        handle.task = asyncio.create_task(worker.run(handle.stop))
        running.append(handle)
        return handle

    yield start
    for handle in running:
        await handle.shutdown()
