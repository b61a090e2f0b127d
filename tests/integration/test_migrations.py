"""Migrations: idempotent, safe to run concurrently, and producing the expected schema."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import pytest
import pytest_asyncio

from shared.jobs import JobEnvelope, new_job_id
from shared.migrate import migrate, migration_files
from shared.store import NewJob, Outcome, Store
from tests.conftest import TestRun
from tests.support import MODEL, request_body

pytestmark = pytest.mark.integration

ALL_MIGRATIONS = [path.name for _, path in migration_files()]


@pytest_asyncio.fixture
async def new_database_url(test_run: TestRun) -> AsyncIterator[str]:
    """The URL of a database that does not exist yet; `migrate` has to create it."""
    url = test_run.database_url(test_run.new_database_name())
    yield url
    await test_run.drop_database(url)


async def applied_versions(url: str) -> list[tuple[int, str]]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT version, name FROM schema_migrations ORDER BY version")
        return [(r["version"], r["name"]) for r in rows]
    finally:
        await conn.close()


async def test_migrate_twice_applies_nothing_the_second_time(new_database_url: str) -> None:
    assert await migrate(new_database_url) == ALL_MIGRATIONS
    assert await migrate(new_database_url) == []
    assert [name for _, name in await applied_versions(new_database_url)] == ALL_MIGRATIONS


async def test_concurrent_migrations_on_a_new_database_apply_each_file_once(
    new_database_url: str,
) -> None:
    first, second = await asyncio.gather(migrate(new_database_url), migrate(new_database_url))
    assert sorted(first + second) == sorted(ALL_MIGRATIONS)
    assert [name for _, name in await applied_versions(new_database_url)] == ALL_MIGRATIONS


async def test_jobs_table_columns(db: asyncpg.Connection) -> None:
    rows = await db.fetch(
        "SELECT column_name, data_type, is_nullable FROM information_schema.columns"
        " WHERE table_schema = 'public' AND table_name = 'jobs' ORDER BY ordinal_position"
    )
    assert [tuple(r) for r in rows] == [
        ("id", "uuid", "NO"),
        ("caller_hash", "bytea", "NO"),
        ("mode", "text", "NO"),
        ("model", "text", "NO"),
        ("provider", "text", "NO"),
        ("status", "text", "NO"),
        ("ttl_seconds", "integer", "NO"),
        ("attempts", "integer", "NO"),
        ("deliveries", "integer", "NO"),
        ("worker_id", "text", "YES"),
        ("http_status", "smallint", "YES"),
        ("error_type", "text", "YES"),
        ("input_tokens", "integer", "YES"),
        ("output_tokens", "integer", "YES"),
        ("cache_creation_input_tokens", "integer", "YES"),
        ("cache_read_input_tokens", "integer", "YES"),
        ("stop_reason", "text", "YES"),
        ("submitted_at", "timestamp with time zone", "NO"),
        ("started_at", "timestamp with time zone", "YES"),
        ("completed_at", "timestamp with time zone", "YES"),
        ("expires_at", "timestamp with time zone", "YES"),
        ("upstream_model", "text", "YES"),
        ("served_provider", "text", "YES"),
        ("served_model", "text", "YES"),
        ("published_at", "timestamp with time zone", "YES"),
        ("lease_until", "timestamp with time zone", "YES"),
        ("not_before", "timestamp with time zone", "YES"),
        ("abandoned", "integer", "NO"),
        ("request_id", "text", "YES"),
        ("key_id", "uuid", "YES"),
        ("webhook_endpoint_id", "uuid", "YES"),
        ("batch_id", "uuid", "YES"),
        ("batch_index", "integer", "YES"),
        ("custom_id", "text", "YES"),
        ("rate_limited", "integer", "NO"),
        ("watched", "boolean", "NO"),
    ]


async def test_job_results_table_columns(db: asyncpg.Connection) -> None:
    rows = await db.fetch(
        "SELECT column_name, data_type, is_nullable FROM information_schema.columns"
        " WHERE table_schema = 'public' AND table_name = 'job_results' ORDER BY ordinal_position"
    )
    assert [tuple(r) for r in rows] == [
        ("job_id", "uuid", "NO"),
        ("body", "json", "NO"),  # json, not jsonb: the provider's bytes come back verbatim
        ("expires_at", "timestamp with time zone", "NO"),
    ]


async def test_tables_and_indexes(db: asyncpg.Connection) -> None:
    tables = await db.fetch(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
    )
    assert {r["table_name"] for r in tables} == {
        "jobs", "job_results", "job_payloads", "idempotency_keys", "schema_migrations",
        "api_keys", "key_usage", "key_leases", "webhook_endpoints", "webhook_endpoint_keys",
        "webhook_deliveries", "webhook_attempts", "batches", "provider_pace", "provider_leases"}
    rows = await db.fetch(
        "SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'"
    )
    indexes = {(r["tablename"], r["indexname"]): r["indexdef"] for r in rows}
    assert set(indexes) == {
        ("jobs", "jobs_pkey"),
        ("jobs", "jobs_submitted_at_idx"),
        ("jobs", "jobs_model_submitted_at_idx"),
        ("jobs", "jobs_unfinished_idx"),
        ("jobs", "jobs_provider_submitted_at_idx"),
        ("job_results", "job_results_pkey"),
        ("job_payloads", "job_payloads_pkey"),
        ("idempotency_keys", "idempotency_keys_pkey"),
        ("idempotency_keys", "idempotency_keys_created_at_idx"),
        ("idempotency_keys", "idempotency_keys_job_id_idx"),
        ("jobs", "jobs_key_submitted_at_idx"),
        ("jobs", "jobs_key_unfinished_idx"),
        ("api_keys", "api_keys_pkey"),
        ("api_keys", "api_keys_name_key"),
        ("api_keys", "api_keys_secret_hash_key"),
        ("key_usage", "key_usage_pkey"),
        ("key_leases", "key_leases_pkey"),
        ("key_leases", "key_leases_key_id_idx"),
        ("job_results", "job_results_expires_at_idx"),
        ("schema_migrations", "schema_migrations_pkey"),
        ("webhook_endpoints", "webhook_endpoints_pkey"),
        ("webhook_endpoints", "webhook_endpoints_name_idx"),
        ("webhook_endpoint_keys", "webhook_endpoint_keys_pkey"),
        ("webhook_deliveries", "webhook_deliveries_pkey"),
        ("webhook_deliveries", "webhook_deliveries_job_id_key"),
        ("webhook_deliveries", "webhook_deliveries_pending_idx"),
        ("webhook_deliveries", "webhook_deliveries_endpoint_created_idx"),
        ("webhook_attempts", "webhook_attempts_pkey"),
        ("webhook_attempts", "webhook_attempts_started_at_idx"),
        ("provider_pace", "provider_pace_pkey"),
        ("provider_leases", "provider_leases_pkey"),
        ("provider_leases", "provider_leases_key_idx"),
        ("batches", "batches_pkey"),
        ("batches", "batches_caller_created_idx"),
        ("batches", "batches_in_progress_idx"),
        ("batches", "batches_created_at_idx"),
        ("jobs", "jobs_batch_idx"),
        ("jobs", "jobs_batch_unfinished_idx"),
    }
    assert "(model, submitted_at)" in indexes[("jobs", "jobs_model_submitted_at_idx")]
    assert "(provider, submitted_at)" in indexes[("jobs", "jobs_provider_submitted_at_idx")]
    assert "(expires_at)" in indexes[("job_results", "job_results_expires_at_idx")]
    pending = indexes[("webhook_deliveries", "webhook_deliveries_pending_idx")]
    assert "WHERE (state = 'pending'::text)" in pending
    assert "WHERE (removed_at IS NULL)" in indexes[("webhook_endpoints",
                                                    "webhook_endpoints_name_idx")]
    for name in ("jobs_unfinished_idx", "jobs_key_unfinished_idx", "jobs_batch_unfinished_idx"):
        assert "(completed_at IS NULL)" in indexes[("jobs", name)]
    # Only finishing a job may change an indexed column (see test_job_writes_before_the_end_
    # are_heap_only): nothing indexes status or published_at.
    assert not [d for (table, _), d in indexes.items()
                if table == "jobs" and ("status" in d or "published_at" in d)]


async def test_results_belong_to_jobs_and_go_with_them(db: asyncpg.Connection) -> None:
    rule = await db.fetchval(
        "SELECT rc.delete_rule FROM information_schema.referential_constraints rc"
        " JOIN information_schema.key_column_usage k"
        " ON k.constraint_name = rc.constraint_name AND k.table_name = 'job_results'"
        " WHERE k.column_name = 'job_id'"
    )
    assert rule == "CASCADE"


async def test_status_and_mode_are_constrained(db: asyncpg.Connection) -> None:
    insert = ("INSERT INTO jobs (id, caller_hash, mode, model, provider, status, ttl_seconds)"
              " VALUES (gen_random_uuid(), '\\x00', $1, 'm', 'anthropic', $2, $3)")
    await db.execute(insert, "async", "pending", 0)
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute(insert, "async", "done", 0)
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute(insert, "bulk", "pending", 0)
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute(insert, "batch", "abandoned", 0)
    with pytest.raises(asyncpg.CheckViolationError):  # ended, but not when
        await db.execute(insert, "batch", "canceled", 0)
    ended = ("INSERT INTO jobs (id, caller_hash, mode, model, provider, status, ttl_seconds,"
             " completed_at) VALUES (gen_random_uuid(), '\\x00', 'batch', 'm', 'anthropic', $1,"
             " 0, $2)")
    await db.execute(ended, "canceled", datetime.now(UTC))
    with pytest.raises(asyncpg.CheckViolationError):  # unfinished, yet ended
        await db.execute(ended, "processing", datetime.now(UTC))
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute(insert, "async", "pending", -1)


async def test_job_writes_before_its_end_are_heap_only(new_database_url: str) -> None:
    """Marking a job published, claiming it and extending its lease change no indexed column,
    so PostgreSQL rewrites the row within its page (a HOT update) and touches none of the
    jobs table's indexes; finishing it is the one full update. A database of its own, and one
    connection whose statistics are flushed before they are read, make the counts exact."""
    await migrate(new_database_url)
    store = await Store.connect(new_database_url, min_size=1, max_size=1)
    try:
        job_id = new_job_id()
        message = JobEnvelope(job_id=job_id, model=MODEL, body=request_body("hi")).encode()
        assert await store.insert_jobs([NewJob(
            id=job_id, caller_hash=b"\x00", mode="async", model=MODEL, provider="anthropic",
            ttl_seconds=60, message=message, upstream_model=MODEL)]) == [None]
        await store.mark_published([job_id])
        assert (await store.claim(job_id, "w1", 30.0)).state == "claimed"
        assert await store.extend_leases([job_id], "w1", 30.0) == set()
        outcome = Outcome(status="completed", body=b'{"content": []}', attempts=1)
        assert await store.finish(job_id, outcome) is True
        async with store._conn() as conn:
            await conn.execute("SELECT pg_stat_force_next_flush()")
            row = await conn.fetchrow("SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables"
                                      " WHERE relname = 'jobs'")
    finally:
        await store.close()
    assert (row["n_tup_upd"], row["n_tup_hot_upd"]) == (4, 3)
