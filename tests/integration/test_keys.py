"""Gateway keys against the real PostgreSQL: the key store, the gate's cache and its NOTIFY
invalidation, and the per-key limits' bookkeeping under concurrency."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
import pytest_asyncio

from api.auth import Gate
from api.limits import Limiter, minute
from shared.errors import AuthenticationFailed, RateLimited, Unavailable
from shared.jobs import JobEnvelope, new_job_id
from shared.keyadmin import NewKey, create_key
from shared.keys import KeyRecord, hash_secret
from shared.keystore import KeyExists, KeyStore
from shared.settings import Settings
from shared.store import NewJob, Store
from tests.support import MODEL, eventually, request_body

pytestmark = pytest.mark.integration


@pytest_asyncio.fixture
async def keystore(store: Store) -> KeyStore:
    return KeyStore(store)


async def make(keystore: KeyStore, **limits: object) -> tuple[KeyRecord, str]:
    return await create_key(keystore, NewKey(name=f"k-{uuid.uuid4().hex[:8]}", **limits))


async def test_a_key_is_stored_hashed_and_found_by_its_secret(
    keystore: KeyStore, db: asyncpg.Connection
) -> None:
    record, secret = await make(keystore, rpm=5, models=["claude-*"])
    row = await db.fetchrow("SELECT * FROM api_keys WHERE id = $1", record.id)
    assert bytes(row["secret_hash"]) == hash_secret(secret)
    assert secret not in str(dict(row)) and row["prefix"] == secret[:15]
    assert await keystore.by_hash(hash_secret(secret)) == record
    assert record.allows("claude-x") and not record.allows("gpt-4o")
    with pytest.raises(KeyExists):
        await create_key(keystore, NewKey(name=record.name))


@pytest_asyncio.fixture
async def gate(settings: Callable[..., Settings], keystore: KeyStore
               ) -> AsyncIterator[Gate]:
    gate = Gate(keystore, settings().database_url)
    async with gate.running():
        assert await gate.wait_listening(10)
        yield gate


async def test_a_revoked_key_is_refused_as_soon_as_the_notification_arrives(
    gate: Gate, keystore: KeyStore
) -> None:
    record, secret = await make(keystore)
    principal = await gate.authenticate({"x-api-key": secret})
    assert principal.key_id == record.id  # cached from here on
    await keystore.revoke(record.name)

    async def refused() -> str | None:
        try:
            await gate.authenticate({"x-api-key": secret})
        except AuthenticationFailed as exc:
            return exc.message
        return None

    message = await eventually(refused, timeout=5, interval=0.01, what="the NOTIFY")
    assert message == f"the API key {record.name!r} was revoked"


async def test_cached_keys_keep_working_while_the_database_is_away(
    settings: Callable[..., Settings]
) -> None:
    store = await Store.connect(settings().database_url, min_size=1, max_size=2)
    keystore = KeyStore(store)
    record, secret = await make(keystore)
    gate = Gate(keystore, settings().database_url)
    assert (await gate.authenticate({"authorization": f"Bearer {secret}"})).key_id == record.id
    await store.close()  # every query now fails as with the database down
    assert (await gate.authenticate({"x-bf-vk": secret})).key_id == record.id
    with pytest.raises(Unavailable, match="cannot verify the API key"):
        await gate.authenticate({"x-api-key": "sk-ferry-never-seen"})


async def test_an_expired_key_says_so(gate: Gate, keystore: KeyStore) -> None:
    record, secret = await make(keystore, expires_in_days=1)
    await keystore.update(record.name, {"expires_at": datetime.now(UTC) - timedelta(hours=1)})

    async def message() -> str | None:
        try:
            await gate.authenticate({"x-api-key": secret})
        except AuthenticationFailed as exc:
            return exc.message
        return None

    assert "expired at" in await eventually(message, timeout=5, what="the expiry")


async def test_requests_are_granted_in_chunks_never_past_the_limit(keystore: KeyStore) -> None:
    record, _ = await make(keystore, rpm=50)
    window = minute(datetime.now(UTC))
    grants = await asyncio.gather(*(keystore.take_requests(record.id, window, 3, 50)
                                    for _ in range(40)))
    assert sum(g.granted for g in grants) == 50
    assert max(g.requests for g in grants) == 50


async def test_two_limiters_share_one_rpm(keystore: KeyStore, gate: Gate) -> None:
    record, secret = await make(keystore, rpm=40)
    principal = await gate.authenticate({"x-api-key": secret})
    limiters = [Limiter(keystore, 60), Limiter(keystore, 60)]
    while datetime.now(UTC).second >= 50:  # windows are clock minutes: stay inside one
        await asyncio.sleep(0.5)
    admitted = refused = 0
    for i in range(100):
        try:
            await limiters[i % 2].admit(principal)
            admitted += 1
        except RateLimited:
            refused += 1
    assert 40 <= admitted <= 44  # one chunk (5 %) per replica may stay unused
    assert admitted + refused == 100


async def test_concurrency_leases_hold_under_contention(keystore: KeyStore) -> None:
    record, _ = await make(keystore, concurrency=3)
    leases = await asyncio.gather(*(keystore.acquire_lease(record.id, 3, 60)
                                    for _ in range(10)))
    taken = [lease for lease in leases if lease is not None]
    assert len(taken) == 3
    await keystore.release_lease(taken[0])
    assert await keystore.acquire_lease(record.id, 3, 60) is not None


async def test_pending_jobs_are_counted_one_submit_after_another(
    settings: Callable[..., Settings], keystore: KeyStore, db: asyncpg.Connection
) -> None:
    record, _ = await make(keystore, max_pending=5)
    stores = [await Store.connect(settings().database_url, min_size=1, max_size=3)
              for _ in range(2)]

    def job() -> NewJob:
        job_id = new_job_id()
        message = JobEnvelope(job_id=job_id, model=MODEL, body=request_body("x")).encode()
        return NewJob(job_id, record.owner, "async", MODEL, "anthropic", 60, message,
                      key_id=record.id, max_pending=5)

    try:
        batches = await asyncio.gather(*(stores[i % 2].insert_jobs([job() for _ in range(3)])
                                         for i in range(6)))
    finally:
        for store in stores:
            await store.close()
    stored = sum(1 for batch in batches for error in batch if error is None)
    refused = [e for batch in batches for e in batch if e is not None]
    assert stored == 5 and len(refused) == 13
    assert all(isinstance(e, RateLimited) for e in refused)
    assert await db.fetchval("SELECT count(*) FROM jobs WHERE key_id = $1", record.id) == 5
