"""The store against the real PostgreSQL: the outbox, idempotent submits, visibility, claims
with leases, the reconciler's repairs, and the sweeper's batches and lock."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

import asyncpg
import orjson
import pytest

from shared.errors import Conflict
from shared.jobs import JobEnvelope, caller_hash, new_job_id
from shared.settings import Settings
from shared.store import (
    Claim,
    Finished,
    HistoryRow,
    NewJob,
    Outcome,
    Store,
    StoreUnavailable,
    body_hash,
)
from tests.integration.conftest import CALLER
from tests.support import MODEL, eventually, request_body
from worker.sweeper import Sweeper

pytestmark = pytest.mark.integration

OTHER_CALLER = caller_hash("key-b", None)
LEASE = 30.0


def new_job(ttl: int = 3600, caller: bytes = CALLER, model: str = MODEL) -> NewJob:
    job_id = new_job_id()
    message = JobEnvelope(job_id=job_id, model=model, body=request_body("hi")).encode()
    return NewJob(id=job_id, caller_hash=caller, mode="async", model=model,
                  provider="anthropic", ttl_seconds=ttl, message=message, upstream_model=model)


async def add_job(store: Store, ttl: int = 3600, caller: bytes = CALLER) -> uuid.UUID:
    job = new_job(ttl, caller)
    assert await store.insert_jobs([job]) == [None]
    await store.mark_published([job.id])
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
    assert (await store.claim(job_id, "w1", LEASE)).state == "claimed"
    assert await store.finish(job_id, completed(text)) is True
    return job_id


async def job_row(db: asyncpg.Connection, job_id: uuid.UUID) -> asyncpg.Record:
    row = await db.fetchrow("SELECT * FROM jobs WHERE id = $1", job_id)
    assert row is not None
    return row


async def expire_lease(db: asyncpg.Connection, job_id: uuid.UUID, ago_s: float = 60) -> None:
    await db.execute("UPDATE jobs SET lease_until = now() - make_interval(secs => $2)"
                     " WHERE id = $1", job_id, float(ago_s))


# --- submit: the outbox ----------------------------------------------------------------------


async def test_insert_commits_the_job_and_its_message_unpublished(
    store: Store, db: asyncpg.Connection
) -> None:
    job = new_job(ttl=120)
    assert await store.insert_jobs([job]) == [None]
    row = await job_row(db, job.id)
    assert (row["status"], row["mode"], row["model"], row["provider"], row["ttl_seconds"],
            row["caller_hash"], row["deliveries"], row["attempts"], row["published_at"]) == (
        "pending", "async", MODEL, "anthropic", 120, CALLER, 0, 0, None)
    assert await db.fetchval("SELECT message FROM job_payloads WHERE job_id = $1",
                             job.id) == job.message
    await store.mark_published([job.id])
    assert (await job_row(db, job.id))["published_at"] is not None


async def test_a_member_the_database_refuses_fails_alone(store: Store,
                                                         db: asyncpg.Connection) -> None:
    good = [new_job() for _ in range(3)]
    bad = new_job(model="nul\u0000model")  # PostgreSQL text cannot hold a NUL
    results = await store.insert_jobs([good[0], bad, good[1], good[2]])
    assert [r is None for r in results] == [True, False, True, True]
    assert results[1] is not None and results[1].status == 400
    ids = {r["id"] for r in await db.fetch("SELECT id FROM jobs")}
    assert ids == {j.id for j in good}


async def test_withdraw_removes_only_jobs_no_worker_took(store: Store,
                                                         db: asyncpg.Connection) -> None:
    waiting, taken = await add_job(store), await add_job(store)
    assert (await store.claim(taken, "w1", LEASE)).state == "claimed"
    await store.withdraw([waiting, taken])
    assert {r["id"] for r in await db.fetch("SELECT id FROM jobs")} == {taken}


async def test_the_same_idempotency_key_names_the_same_job(store: Store,
                                                            db: asyncpg.Connection) -> None:
    first, again = new_job(), new_job()
    fingerprint = body_hash(b"the request")
    assert await store.insert_idempotent(first, "key-1", fingerprint) == (
        first.id, "pending", True)
    assert await store.insert_idempotent(again, "key-1", fingerprint) == (
        first.id, "pending", False)
    # Another caller's key of the same name is another job.
    other = new_job(caller=OTHER_CALLER)
    assert (await store.insert_idempotent(other, "key-1", fingerprint))[2] is True
    with pytest.raises(Conflict, match="already used with a different request"):
        await store.insert_idempotent(new_job(), "key-1", body_hash(b"another request"))
    assert await db.fetchval("SELECT count(*) FROM jobs") == 2


async def test_concurrent_submits_with_one_key_make_one_job(store: Store,
                                                            db: asyncpg.Connection) -> None:
    jobs = [new_job() for _ in range(8)]
    fingerprint = body_hash(b"same")
    results = await asyncio.gather(*(store.insert_idempotent(j, "k", fingerprint) for j in jobs))
    assert len({job_id for job_id, _, _ in results}) == 1
    assert sum(created for _, _, created in results) == 1
    assert await db.fetchval("SELECT count(*) FROM jobs") == 1


async def test_an_idempotency_key_expires_after_a_day(store: Store,
                                                      db: asyncpg.Connection) -> None:
    first = new_job()
    await store.insert_idempotent(first, "k", body_hash(b"x"))
    await db.execute("UPDATE idempotency_keys SET created_at = now() - interval '25 hours'")
    later = new_job()
    assert await store.insert_idempotent(later, "k", body_hash(b"y")) == (
        later.id, "pending", True)
    assert await store.sweep_idempotency_keys(100) == 0  # the old row was replaced
    await db.execute("UPDATE idempotency_keys SET created_at = now() - interval '25 hours'")
    assert await store.sweep_idempotency_keys(100) == 1


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
    await store.claim(job_id, "w1", LEASE)
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


# --- claims and leases -----------------------------------------------------------------------


async def test_claim_takes_the_job_with_a_lease(store: Store, db: asyncpg.Connection) -> None:
    job_id = await add_job(store, ttl=60)
    claim = await store.claim(job_id, "w1", LEASE)
    assert claim == Claim("claimed", "processing", attempts=0, abandoned=0, ttl_seconds=60)
    row = await job_row(db, job_id)
    assert (row["status"], row["worker_id"], row["deliveries"]) == ("processing", "w1", 1)
    assert row["started_at"] is not None
    lease = (row["lease_until"] - row["started_at"]).total_seconds()
    assert LEASE - 5 < lease <= LEASE + 1


async def test_a_live_lease_holds_the_job_for_its_worker(store: Store) -> None:
    job_id = await add_job(store)
    await store.claim(job_id, "w1", LEASE)
    held = await store.claim(job_id, "w2", LEASE)
    assert (held.state, held.holder) == ("held", "w1")
    assert 0 < held.lease_remaining_s <= LEASE
    assert await store.extend_leases([job_id], "w1", LEASE) == set()
    assert await store.extend_leases([job_id], "w2", LEASE) == {job_id}  # not w2's


async def test_an_expired_lease_is_taken_over_and_counted(store: Store,
                                                          db: asyncpg.Connection) -> None:
    job_id = await add_job(store)
    await store.claim(job_id, "w1", LEASE)
    await expire_lease(db, job_id)
    claim = await store.claim(job_id, "w2", LEASE)
    assert (claim.state, claim.abandoned) == ("claimed", 1)
    row = await job_row(db, job_id)
    assert (row["worker_id"], row["deliveries"], row["abandoned"]) == ("w2", 2, 1)
    assert await store.extend_leases([job_id], "w1", LEASE) == {job_id}  # w1 lost it


async def test_claim_of_an_unknown_job_is_missing(store: Store) -> None:
    assert (await store.claim(uuid.uuid4(), "w1", LEASE)).state == "missing"


async def test_a_parked_job_is_not_claimed_before_it_is_due(store: Store,
                                                            db: asyncpg.Connection) -> None:
    job_id = await add_job(store)
    await store.claim(job_id, "w1", LEASE)
    await store.park(job_id, "w1", attempts=2, delay_s=30)
    row = await job_row(db, job_id)
    assert (row["status"], row["attempts"], row["lease_until"]) == ("pending", 2, None)
    assert (await store.claim(job_id, "w2", LEASE)).state == "parked"
    await db.execute("UPDATE jobs SET not_before = now() WHERE id = $1", job_id)
    claim = await store.claim(job_id, "w2", LEASE)
    assert (claim.state, claim.attempts, claim.abandoned) == ("claimed", 2, 0)


async def test_release_hands_the_job_back_uncounted(store: Store,
                                                    db: asyncpg.Connection) -> None:
    job_id = await add_job(store)
    await store.claim(job_id, "w1", LEASE)
    await store.release(job_id, "w1", attempts=1)
    claim = await store.claim(job_id, "w2", LEASE)
    assert (claim.state, claim.attempts, claim.abandoned) == ("claimed", 1, 0)


async def test_finish_records_the_outcome_and_drops_the_message(
    store: Store, db: asyncpg.Connection
) -> None:
    job_id = await add_job(store, ttl=90)
    await store.claim(job_id, "w1", LEASE)
    assert await store.finish(job_id, completed("x", attempts=2)) is True
    row = await job_row(db, job_id)
    assert (row["status"], row["attempts"], row["stop_reason"], row["input_tokens"],
            row["output_tokens"], row["cache_creation_input_tokens"],
            row["cache_read_input_tokens"], row["http_status"], row["error_type"],
            row["lease_until"]) == ("completed", 2, "end_turn", 3, 2, 0, 0, None, None, None)
    assert (row["expires_at"] - row["completed_at"]).total_seconds() == 90
    result = await db.fetchrow("SELECT body::text AS body, expires_at FROM job_results"
                               " WHERE job_id = $1", job_id)
    assert result["body"].encode() == completed("x").body
    assert result["expires_at"] == row["expires_at"]
    assert await db.fetchval("SELECT count(*) FROM job_payloads") == 0


async def test_finish_twice_keeps_the_first_result(store: Store, db: asyncpg.Connection) -> None:
    job_id = await add_job(store)
    await store.claim(job_id, "w1", LEASE)
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
    await store.claim(job_id, "w1", LEASE)
    await store.finish(job_id, failed(400, "invalid_request_error"))
    before = await job_row(db, job_id)
    assert await store.claim(job_id, "w2", LEASE) == Claim("finished", "failed")
    assert dict(await job_row(db, job_id)) == dict(before)


# --- claims and finishes in batches ------------------------------------------------------------


async def test_claims_of_many_jobs_in_one_call_answer_each_in_order(
    store: Store, db: asyncpg.Connection
) -> None:
    waiting = [await add_job(store) for _ in range(5)]
    held, done, taken_over = await add_job(store), await add_job(store), await add_job(store)
    await store.claim(held, "w1", LEASE)
    await store.claim(taken_over, "w1", LEASE)
    await expire_lease(db, taken_over)
    await store.claim(done, "w1", LEASE)
    await store.finish(done, completed("done"))
    unknown = uuid.uuid4()

    ids = [waiting[0], held, unknown, *waiting[1:], done, taken_over]
    claims = await store.claim_jobs(ids, "w2", LEASE)
    assert [c.state for c in claims] == (
        ["claimed", "held", "missing"] + ["claimed"] * 4 + ["finished", "claimed"])
    assert claims[1].holder == "w1"
    assert (claims[-1].abandoned, claims[0].abandoned) == (1, 0)
    rows = await db.fetch("SELECT id, worker_id, deliveries FROM jobs WHERE id = ANY($1)",
                          [*waiting, taken_over, held])
    assert {r["id"]: (r["worker_id"], r["deliveries"]) for r in rows} == {
        **{job_id: ("w2", 1) for job_id in waiting}, taken_over: ("w2", 2), held: ("w1", 1)}


async def test_finishes_of_many_jobs_commit_each_outcome(store: Store,
                                                          db: asyncpg.Connection) -> None:
    ids = [await add_job(store, ttl=60 + i) for i in range(6)]
    await store.claim_jobs(ids, "w1", LEASE)
    await store.finish(ids[5], completed("earlier"))
    outcomes = [completed(f"job {i}") for i in range(5)] + [failed(500, "api_error")]
    results = await store.finish_jobs([*zip(ids, outcomes, strict=True),
                                       (ids[0], failed(500, "api_error"))])
    assert results == [Finished()] * 5 + [None, None]  # finished already; a repeat
    for i, job_id in enumerate(ids):
        view = await store.get_job(job_id, CALLER)
        assert view is not None and view.status == "completed" and view.body is not None
        assert orjson.loads(view.body)["content"][0]["text"] == (
            f"job {i}" if i < 5 else "earlier")
        row = await job_row(db, job_id)
        assert (row["expires_at"] - row["completed_at"]).total_seconds() == 60 + i
    assert await db.fetchval("SELECT count(*) FROM job_payloads") == 0


async def test_an_outcome_the_database_refuses_fails_alone(store: Store,
                                                          db: asyncpg.Connection) -> None:
    ids = [await add_job(store) for _ in range(4)]
    await store.claim_jobs(ids, "w1", LEASE)
    bad = Outcome(status="completed", body=b"not json", attempts=1)
    outcomes = [completed("a"), bad, completed("c"), Outcome("failed", b"\xff", 1)]
    results = await store.finish_jobs(list(zip(ids, outcomes, strict=True)))
    assert results[0] == results[2] == Finished()
    assert isinstance(results[1], asyncpg.DataError)
    assert isinstance(results[3], UnicodeDecodeError)
    statuses = [(await job_row(db, job_id))["status"] for job_id in ids]
    assert statuses == ["completed", "processing", "completed", "processing"]
    with pytest.raises(asyncpg.DataError):
        await store.finish_job(ids[1], bad)  # alone, the error is raised


async def test_an_outage_mid_batch_stores_nothing_and_a_retry_stores_all(
    store: Store, db: asyncpg.Connection
) -> None:
    ids = [await add_job(store) for _ in range(3)]
    await store.claim_jobs(ids, "w1", LEASE)
    async with db.transaction():
        # The batch's UPDATE waits for this lock; meanwhile its connection is cut, as when
        # PostgreSQL restarts.
        await db.execute("SELECT 1 FROM jobs WHERE id = $1 FOR UPDATE", ids[2])
        batch = asyncio.create_task(store.finish_jobs([(i, completed("x")) for i in ids]))

        async def waiting_backend() -> int | None:
            return await db.fetchval(
                "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND datname = current_database()")

        pid = await eventually(waiting_backend, what="the batch to wait for the lock")
        await db.execute("SELECT pg_terminate_backend($1)", pid)
        with pytest.raises(StoreUnavailable):
            await batch
    assert [(await job_row(db, i))["status"] for i in ids] == ["processing"] * 3
    assert await store.finish_jobs([(i, completed("x")) for i in ids]) == [Finished()] * 3


# --- the reconciler's repairs ------------------------------------------------------------------


async def test_unpublished_jobs_are_found_with_their_messages(
    store: Store, db: asyncpg.Connection
) -> None:
    fresh, old, published = new_job(), new_job(), await add_job(store)
    await store.insert_jobs([fresh, old])
    await db.execute("UPDATE jobs SET submitted_at = now() - interval '1 minute'"
                     " WHERE id = ANY($1::uuid[])", [old.id, published])
    assert [(m.job_id, m.message) for m in await store.unpublished(15, 100)] == [(old.id, old.message)]


async def test_expired_leases_are_released_for_republishing(store: Store,
                                                            db: asyncpg.Connection) -> None:
    live, dead = await add_job(store), await add_job(store)
    for job_id in (live, dead):
        await store.claim(job_id, "w1", LEASE)
    await expire_lease(db, dead)
    assert await store.recover_expired_leases(10, 100) == [dead]
    row = await job_row(db, dead)
    assert (row["status"], row["published_at"], row["abandoned"]) == ("pending", None, 1)
    assert (await job_row(db, live))["status"] == "processing"
    assert [m.job_id for m in await store.messages([dead])] == [dead]


async def test_overdue_parked_and_stale_pending_jobs_are_released(
    store: Store, db: asyncpg.Connection
) -> None:
    parked, stale, recent = await add_job(store), await add_job(store), await add_job(store)
    await store.claim(parked, "w1", LEASE)
    await store.park(parked, "w1", 1, delay_s=10)
    await db.execute("UPDATE jobs SET not_before = now() - interval '5 minutes' WHERE id = $1",
                     parked)
    await db.execute("UPDATE jobs SET published_at = now() - interval '1 hour' WHERE id = $1",
                     stale)
    assert await store.release_overdue_parked(60, 100) == [parked]
    assert await store.release_stale_pending(600, 100) == [stale]
    rows = {r["id"]: r for r in await db.fetch("SELECT * FROM jobs")}
    assert rows[parked]["published_at"] is None and rows[parked]["not_before"] is None
    assert rows[stale]["published_at"] is None
    assert rows[recent]["published_at"] is not None


async def test_history_rows_the_database_refuses_are_dropped_alone(
    store: Store, db: asyncpg.Connection
) -> None:
    from datetime import UTC, datetime

    now = datetime.now(UTC)

    def row(model: str) -> HistoryRow:
        return HistoryRow(uuid.uuid4(), CALLER, "sync", model, "anthropic", "completed", 1,
                          "w1", None, None, "end_turn", 1, 1, "anthropic", model, model,
                          now, now, now, "req_1")

    rows = [row("a"), row("bad\u0000"), row("b")]
    assert await store.record_history(rows) == 1
    stored = {r["model"] for r in await db.fetch("SELECT model FROM jobs")}
    assert stored == {"a", "b"}


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
