"""The store against the real PostgreSQL: submit transactions, visibility, claim/finish
idempotency, and the sweeper's batches and lock."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

import asyncpg
import orjson
import pytest

from shared.errors import Overloaded
from shared.jobs import caller_hash, new_job_id
from shared.settings import Settings
from shared.store import Claim, NewJob, Outcome, Store
from tests.integration.conftest import CALLER
from tests.support import MODEL
from worker.sweeper import Sweeper

pytestmark = pytest.mark.integration

OTHER_CALLER = caller_hash("key-b", None)


def new_job(ttl: int = 3600, caller: bytes = CALLER) -> NewJob:
    return NewJob(id=new_job_id(), caller_hash=caller, mode="async", model=MODEL,
                  provider="anthropic", ttl_seconds=ttl, upstream_model=MODEL)


async def add_job(store: Store, ttl: int = 3600, caller: bytes = CALLER) -> uuid.UUID:
    job = new_job(ttl, caller)
    async with store.submitting(job):
        pass
    return job.id


def completed(text: str, attempts: int = 1) -> Outcome:
    body = orjson.dumps({"id": "msg_1", "type": "message", "role": "assistant", "model": MODEL,
                         "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
                         "usage": {"input_tokens": 3, "output_tokens": 2}})
    return Outcome(status="completed", body=body, attempts=attempts, stop_reason="end_turn",
                   input_tokens=3, output_tokens=2, cache_creation_input_tokens=0,
                   cache_read_input_tokens=0)


def failed(status: int, error_type: str) -> Outcome:
    body = orjson.dumps({"type": "error", "error": {"type": error_type, "message": "no"}})
    return Outcome(status="failed", body=body, attempts=1, http_status=status,
                   error_type=error_type)


async def finish_job(store: Store, ttl: int = 3600, text: str = "done",
                     caller: bytes = CALLER) -> uuid.UUID:
    job_id = await add_job(store, ttl, caller)
    assert await store.claim(job_id, "w1") is not None
    assert await store.finish(job_id, completed(text)) is True
    return job_id


async def job_row(db: asyncpg.Connection, job_id: uuid.UUID) -> asyncpg.Record:
    row = await db.fetchrow("SELECT * FROM jobs WHERE id = $1", job_id)
    assert row is not None
    return row


# --- submit ----------------------------------------------------------------------------------


async def test_submitting_commits_when_the_body_succeeds(store: Store,
                                                         db: asyncpg.Connection) -> None:
    job = new_job(ttl=120)
    async with store.submitting(job):
        # Not visible to anyone else until the publish succeeded.
        assert await db.fetchval("SELECT count(*) FROM jobs WHERE id = $1", job.id) == 0
    row = await job_row(db, job.id)
    assert (row["status"], row["mode"], row["model"], row["provider"], row["ttl_seconds"],
            row["caller_hash"], row["deliveries"], row["attempts"]) == (
        "pending", "async", MODEL, "anthropic", 120, CALLER, 0, 0)
    assert row["submitted_at"] is not None and row["expires_at"] is None


@pytest.mark.parametrize("error", [RuntimeError("publish failed"), Overloaded("queue full")])
async def test_submitting_leaves_no_row_when_the_body_raises(
    store: Store, db: asyncpg.Connection, error: Exception
) -> None:
    job = new_job()
    with pytest.raises(type(error)) as raised:
        async with store.submitting(job):
            raise error
    assert raised.value is error  # passed through untranslated
    assert await db.fetchval("SELECT count(*) FROM jobs") == 0


# --- get_job ---------------------------------------------------------------------------------


async def test_get_job_shows_a_pending_job_to_its_submitter_only(store: Store) -> None:
    job_id = await add_job(store)
    view = await store.get_job(job_id, CALLER)
    assert view is not None
    assert (view.id, view.status, view.model, view.http_status, view.body) == (
        job_id, "pending", MODEL, None, None)
    assert await store.get_job(job_id, OTHER_CALLER) is None
    assert await store.get_job(uuid.uuid4(), CALLER) is None


async def test_get_job_returns_the_stored_result_verbatim(store: Store) -> None:
    job_id = await finish_job(store, text="héllo")
    view = await store.get_job(job_id, CALLER)
    assert view is not None and view.status == "completed"
    assert view.body is not None and view.body.encode() == completed("héllo").body
    assert await store.get_job(job_id, OTHER_CALLER) is None


async def test_get_job_returns_a_failure_with_its_status(store: Store) -> None:
    job_id = await add_job(store)
    await store.claim(job_id, "w1")
    assert await store.finish(job_id, failed(403, "permission_error"))
    view = await store.get_job(job_id, CALLER)
    assert view is not None
    assert (view.status, view.http_status) == ("failed", 403)
    assert view.body is not None
    assert orjson.loads(view.body)["error"]["type"] == "permission_error"


async def test_get_job_hides_an_expired_result_before_the_sweep(
    store: Store, db: asyncpg.Connection
) -> None:
    job_id = await finish_job(store, ttl=0)  # expires the moment it finishes
    assert await store.get_job(job_id, CALLER) is None
    # Hidden, not deleted: no sweeper has run.
    assert await db.fetchval("SELECT count(*) FROM job_results WHERE job_id = $1", job_id) == 1

    later = await finish_job(store, ttl=3600)
    assert await store.get_job(later, CALLER) is not None
    await db.execute("UPDATE jobs SET expires_at = now() - interval '1 second' WHERE id = $1",
                     later)
    assert await store.get_job(later, CALLER) is None


async def test_get_job_hides_a_swept_result(store: Store, db: asyncpg.Connection) -> None:
    job_id = await finish_job(store, ttl=3600)
    await db.execute("DELETE FROM job_results WHERE job_id = $1", job_id)
    assert (await job_row(db, job_id))["expires_at"] is not None
    assert await store.get_job(job_id, CALLER) is None


# --- claim / finish --------------------------------------------------------------------------


async def test_claim_marks_processing_and_counts_deliveries(store: Store,
                                                            db: asyncpg.Connection) -> None:
    job_id = await add_job(store, ttl=60)
    assert await store.claim(job_id, "w1") == Claim("processing", 1, 60)
    first = await job_row(db, job_id)
    assert (first["status"], first["worker_id"]) == ("processing", "w1")
    assert first["started_at"] is not None

    # A redelivery (the first worker died): counted, taken over, started_at kept.
    assert await store.claim(job_id, "w2") == Claim("processing", 2, 60)
    second = await job_row(db, job_id)
    assert (second["worker_id"], second["started_at"]) == ("w2", first["started_at"])


async def test_claim_of_an_unknown_job_is_none(store: Store) -> None:
    assert await store.claim(uuid.uuid4(), "w1") is None


async def test_finish_records_the_outcome(store: Store, db: asyncpg.Connection) -> None:
    job_id = await add_job(store, ttl=90)
    await store.claim(job_id, "w1")
    assert await store.finish(job_id, completed("x", attempts=2)) is True
    row = await job_row(db, job_id)
    assert (row["status"], row["attempts"], row["stop_reason"], row["input_tokens"],
            row["output_tokens"], row["cache_creation_input_tokens"],
            row["cache_read_input_tokens"], row["http_status"], row["error_type"]) == (
        "completed", 2, "end_turn", 3, 2, 0, 0, None, None)
    assert (row["expires_at"] - row["completed_at"]).total_seconds() == 90
    result = await db.fetchrow("SELECT body::text AS body, expires_at FROM job_results"
                               " WHERE job_id = $1", job_id)
    assert result["body"].encode() == completed("x").body
    assert result["expires_at"] == row["expires_at"]


async def test_finish_twice_keeps_the_first_result(store: Store, db: asyncpg.Connection) -> None:
    job_id = await add_job(store)
    await store.claim(job_id, "w1")
    assert await store.finish(job_id, completed("first")) is True
    before = await job_row(db, job_id)

    assert await store.finish(job_id, failed(500, "api_error")) is False
    after = await job_row(db, job_id)
    assert dict(after) == dict(before)
    view = await store.get_job(job_id, CALLER)
    assert view is not None and view.status == "completed"
    assert view.body is not None and "first" in view.body


async def test_claim_of_a_finished_job_changes_nothing(store: Store,
                                                       db: asyncpg.Connection) -> None:
    job_id = await add_job(store)
    await store.claim(job_id, "w1")
    await store.finish(job_id, failed(400, "invalid_request_error"))
    before = await job_row(db, job_id)

    assert await store.claim(job_id, "w2") == Claim("failed", 1, 3600)
    assert dict(await job_row(db, job_id)) == dict(before)


# --- sweeper ---------------------------------------------------------------------------------


class RecordingStore(Store):
    """The real store, remembering the size of every batch it deleted."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        super().__init__(pool)
        self.batches: list[int] = []

    async def sweep_expired(self, batch: int) -> int:
        deleted = await super().sweep_expired(batch)
        self.batches.append(deleted)
        return deleted


async def test_sweep_deletes_expired_results_in_batches_and_keeps_history(
    settings: Callable[..., Settings], store: Store, db: asyncpg.Connection
) -> None:
    expired = [await finish_job(store, ttl=0, text=f"old {i}") for i in range(7)]
    live = [await finish_job(store, ttl=3600, text=f"new {i}") for i in range(2)]
    pending = await add_job(store, ttl=0)

    assert await store.sweep_expired(3) == 3
    pool = await asyncpg.create_pool(settings().database_url, min_size=1, max_size=2)
    recording = RecordingStore(pool)
    try:
        sweeper = Sweeper(settings(sweep_batch=3), recording)
        assert await sweeper.sweep_once() == 4
        assert recording.batches == [3, 1]
        assert await sweeper.sweep_once() == 0
    finally:
        await recording.close()

    left = await db.fetch("SELECT job_id FROM job_results")
    assert {r["job_id"] for r in left} == set(live)
    # The history rows all stay.
    rows = await db.fetch("SELECT id, status FROM jobs")
    assert {r["id"]: r["status"] for r in rows} == {
        **{job_id: "completed" for job_id in expired + live}, pending: "pending"}


class GatedStore(Store):
    """The real store, pausing inside a sweep until the test lets it go on."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        super().__init__(pool)
        self.inside = asyncio.Event()
        self.go_on = asyncio.Event()

    async def sweep_expired(self, batch: int) -> int:
        self.inside.set()
        await self.go_on.wait()
        return await super().sweep_expired(batch)


async def test_two_sweepers_at_once_only_one_sweeps(
    settings: Callable[..., Settings], store: Store, db: asyncpg.Connection
) -> None:
    for i in range(3):
        await finish_job(store, ttl=0, text=f"old {i}")
    s = settings()
    gated = GatedStore(await asyncpg.create_pool(s.database_url, min_size=1, max_size=2))
    other = await Store.connect(s.database_url, min_size=1, max_size=2)
    try:
        first = asyncio.create_task(Sweeper(s, gated).sweep_once())
        await asyncio.wait_for(gated.inside.wait(), timeout=10)
        assert await Sweeper(s, other).sweep_once() is None  # the lock is taken
        gated.go_on.set()
        assert await asyncio.wait_for(first, timeout=10) == 3
        # The lock was released: the other replica may sweep now (nothing is left).
        assert await Sweeper(s, other).sweep_once() == 0
    finally:
        gated.go_on.set()
        await gated.close()
        await other.close()
    assert await db.fetchval("SELECT count(*) FROM job_results") == 0
