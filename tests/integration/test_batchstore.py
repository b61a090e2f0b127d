"""The batch store on the real PostgreSQL and RabbitMQ: a create is all or nothing, and the
reconciler leaves a batch's unpublished requests to the api publishing them for as long as it
makes progress, then publishes them itself, on the batch lane."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import asyncpg
import pytest

from shared.batchstore import BatchJob, BatchStore
from shared.broker import Broker
from shared.jobs import JobEnvelope
from shared.settings import Settings
from shared.store import Store
from tests.integration.conftest import CALLER
from tests.support import MODEL, eventually, request_body
from worker.reconciler import Reconciler


class Boom(Exception):
    pass


async def create(batches: BatchStore, count: int, *, fail: bool = False) -> uuid.UUID:
    async with batches.creating(CALLER, None, "req_test", 3600, 86400) as writer:
        for i in range(count):
            job_id = uuid.uuid4()
            envelope = JobEnvelope(job_id=job_id, model=MODEL, body=request_body(f"r{i}"),
                                   mode="batch")
            await writer.add(BatchJob(job_id, i, f"r{i}", MODEL, "anthropic", MODEL,
                                      envelope.encode()))
        if fail:
            raise Boom
    return writer.batch_id


async def test_a_create_that_fails_midway_leaves_nothing(
        db: asyncpg.Connection, store: Store, settings: Callable[..., Settings]) -> None:
    batches = BatchStore(store, settings().database_url)
    with pytest.raises(Boom):
        await create(batches, 2500, fail=True)  # past one COPY chunk
    assert await db.fetchval("SELECT count(*) FROM jobs") == 0
    assert await db.fetchval("SELECT count(*) FROM job_payloads") == 0
    assert await db.fetchval("SELECT count(*) FROM batches") == 0
    batch_id = await create(batches, 3)
    assert await db.fetchval("SELECT request_count FROM batches WHERE id = $1", batch_id) == 3
    assert await db.fetchval("SELECT count(*) FROM jobs WHERE batch_id = $1"
                             " AND mode = 'batch' AND status = 'pending'", batch_id) == 3


async def test_the_reconciler_publishes_a_batch_only_once_its_publisher_stalls(
        db: asyncpg.Connection, store: Store, broker: Broker,
        settings: Callable[..., Settings]) -> None:
    batches = BatchStore(store, settings().database_url)
    batch_id = await create(batches, 3)
    # Committed long ago, as a big batch whose publishing is still going on would be.
    await db.execute("UPDATE jobs SET submitted_at = now() - interval '1 hour'"
                     " WHERE batch_id = $1", batch_id)
    first = await db.fetchval("SELECT id FROM jobs WHERE batch_id = $1 AND batch_index = 0",
                              batch_id)
    await batches.published_some(batch_id, [first])  # the api's publisher made progress
    reconciler = Reconciler(settings(outbox_grace_s=15), store, broker)
    assert await store.unpublished(15, 100) == []
    done = await reconciler.reconcile_once()
    assert done is not None and done["republished"] == 0
    # The publisher stopped (its api died): past the grace, the reconciler takes over.
    await db.execute("UPDATE batches SET publishing_at = now() - interval '1 minute'"
                     " WHERE id = $1", batch_id)
    left = await store.unpublished(15, 100)
    assert {m.mode for m in left} == {"batch"} and len(left) == 2
    done = await reconciler.reconcile_once()
    assert done is not None and done["republished"] == 2
    assert await db.fetchval("SELECT count(*) FROM jobs WHERE batch_id = $1"
                             " AND published_at IS NULL", batch_id) == 0

    async def queued() -> bool:
        return (await broker.queue_depths())["batch"] == 2

    await eventually(queued, timeout=10, what="the two requests on the batch lane")
