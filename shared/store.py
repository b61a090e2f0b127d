"""All SQL. The api and the worker talk to PostgreSQL only through this module."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from shared.errors import Unavailable
from shared.jobs import Mode, Status


@dataclass(frozen=True, slots=True)
class NewJob:
    id: uuid.UUID
    caller_hash: bytes
    mode: Mode
    model: str
    provider: str
    ttl_seconds: int
    upstream_model: str | None = None


@dataclass(frozen=True, slots=True)
class JobView:
    """What a poll sees. `body` is the stored result (message or error envelope), verbatim."""

    id: uuid.UUID
    status: Status
    model: str
    http_status: int | None
    body: str | None


@dataclass(frozen=True, slots=True)
class Claim:
    status: Status
    deliveries: int
    ttl_seconds: int


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a job ended, for the history row."""

    status: Status  # completed | failed
    body: bytes
    attempts: int
    http_status: int | None = None
    error_type: str | None = None
    stop_reason: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None
    served_provider: str | None = None
    served_model: str | None = None


@dataclass(frozen=True, slots=True)
class HistoryRow:
    """A finished sync or stream request, recorded after the client got its answer."""

    id: uuid.UUID
    caller_hash: bytes
    mode: Mode
    model: str
    provider: str
    status: Status
    attempts: int
    worker_id: str
    http_status: int | None
    error_type: str | None
    stop_reason: str | None
    input_tokens: int | None
    output_tokens: int | None
    served_provider: str | None
    served_model: str | None
    upstream_model: str | None
    submitted_at: datetime
    started_at: datetime
    completed_at: datetime


_HISTORY_COLUMNS = [
    "id", "caller_hash", "mode", "model", "provider", "status", "attempts", "worker_id",
    "http_status", "error_type", "stop_reason", "input_tokens", "output_tokens",
    "served_provider", "served_model", "upstream_model",
    "submitted_at", "started_at", "completed_at", "ttl_seconds", "deliveries",
]


_POSTGRES_DOWN = (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
                  asyncpg.CannotConnectNowError, asyncpg.TooManyConnectionsError)


class Store:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @classmethod
    async def connect(cls, dsn: str, *, min_size: int = 2, max_size: int = 20) -> Store:
        pool = await asyncpg.create_pool(dsn, min_size=min_size, max_size=max_size)
        return cls(pool)

    async def close(self) -> None:
        await self._pool.close()

    async def ping(self) -> None:
        await self._pool.fetchval("SELECT 1")

    # --- api -------------------------------------------------------------------------------

    @asynccontextmanager
    async def submitting(self, job: NewJob) -> AsyncIterator[None]:
        """Insert the job and keep the transaction open while the caller publishes it.

        The row commits only if the body of the `async with` succeeds (the broker confirmed),
        so a failed publish or a crash leaves no job behind that would stay pending forever.
        """
        async with self.submitting_many([job]):
            yield

    @asynccontextmanager
    async def submitting_many(
        self, jobs: list[NewJob]
    ) -> AsyncIterator[Callable[[list[uuid.UUID]], Awaitable[None]]]:
        """`submitting` for a batch: one INSERT, one commit. Yields `discard(ids)`, which
        removes the rows of jobs whose publish failed before the rest commit."""
        try:
            conn: asyncpg.Connection
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.execute(
                    "INSERT INTO jobs (id, caller_hash, mode, model, provider, ttl_seconds,"
                    " upstream_model) SELECT * FROM unnest($1::uuid[], $2::bytea[], $3::text[],"
                    " $4::text[], $5::text[], $6::integer[], $7::text[])",
                    [j.id for j in jobs], [j.caller_hash for j in jobs], [j.mode for j in jobs],
                    [j.model for j in jobs], [j.provider for j in jobs],
                    [j.ttl_seconds for j in jobs], [j.upstream_model for j in jobs],
                )

                async def discard(ids: list[uuid.UUID]) -> None:
                    await conn.execute("DELETE FROM jobs WHERE id = ANY($1::uuid[])", ids)

                yield discard
        except _POSTGRES_DOWN as exc:
            raise Unavailable("the job store is unavailable; retry later") from exc

    async def get_job(self, job_id: uuid.UUID, caller_hash: bytes) -> JobView | None:
        """The job as its submitter may see it; None if unknown, someone else's, or expired."""
        try:
            row = await self._pool.fetchrow(
                "SELECT j.status, j.model, j.http_status, r.body"
                " FROM jobs j LEFT JOIN job_results r ON r.job_id = j.id"
                " WHERE j.id = $1 AND j.caller_hash = $2"
                " AND (j.expires_at IS NULL OR j.expires_at > now())",
                job_id, caller_hash,
            )
        except _POSTGRES_DOWN as exc:
            raise Unavailable("the job store is unavailable; retry later") from exc
        if row is None:
            return None
        status = row["status"]
        if status in ("completed", "failed") and row["body"] is None:
            return None  # result already swept
        return JobView(job_id, status, row["model"], row["http_status"], row["body"])

    async def unfinished_counts(self) -> dict[str, int]:
        rows = await self._pool.fetch(
            "SELECT status, count(*) AS n FROM jobs"
            " WHERE status IN ('pending', 'processing') GROUP BY status"
        )
        counts = {"pending": 0, "processing": 0}
        counts.update({r["status"]: r["n"] for r in rows})
        return counts

    # --- worker ----------------------------------------------------------------------------

    async def claim(self, job_id: uuid.UUID, worker_id: str) -> Claim | None:
        """Mark the job processing (again, after a redelivery). None if there is no such job;
        a finished job is returned unchanged so a redelivered message is simply acked."""
        row = await self._pool.fetchrow(
            "WITH claimed AS ("
            " UPDATE jobs SET status = 'processing', started_at = coalesce(started_at, now()),"
            " deliveries = deliveries + 1, worker_id = $2"
            " WHERE id = $1 AND status IN ('pending', 'processing')"
            " RETURNING status, deliveries, ttl_seconds)"
            " SELECT * FROM claimed UNION ALL"
            " SELECT status, deliveries, ttl_seconds FROM jobs"
            " WHERE id = $1 AND NOT EXISTS (SELECT FROM claimed)",
            job_id, worker_id,
        )
        if row is None:
            return None
        return Claim(row["status"], row["deliveries"], row["ttl_seconds"])

    async def finish(self, job_id: uuid.UUID, outcome: Outcome) -> bool:
        """Store the result and the history in one transaction. Idempotent: a job that is
        already finished keeps its first result; returns whether this call finished it."""
        conn: asyncpg.Connection
        async with self._pool.acquire() as conn, conn.transaction():
            expires_at: datetime | None = await conn.fetchval(
                "UPDATE jobs SET status = $2, attempts = attempts + $3, http_status = $4,"
                " error_type = $5, stop_reason = $6, input_tokens = $7, output_tokens = $8,"
                " cache_creation_input_tokens = $9, cache_read_input_tokens = $10,"
                " served_provider = $11, served_model = $12,"
                " completed_at = now(), expires_at = now() + make_interval(secs => ttl_seconds)"
                " WHERE id = $1 AND status IN ('pending', 'processing')"
                " RETURNING expires_at",
                job_id, outcome.status, outcome.attempts, outcome.http_status,
                outcome.error_type, outcome.stop_reason, outcome.input_tokens,
                outcome.output_tokens, outcome.cache_creation_input_tokens,
                outcome.cache_read_input_tokens, outcome.served_provider, outcome.served_model,
            )
            if expires_at is None:
                return False
            await conn.execute(
                "INSERT INTO job_results (job_id, body, expires_at) VALUES ($1, $2, $3)"
                " ON CONFLICT (job_id) DO NOTHING",
                job_id, outcome.body.decode(), expires_at,
            )
            return True

    async def record_history(self, rows: list[HistoryRow]) -> None:
        """Bulk-insert finished interactive requests (COPY: one round trip per batch)."""
        records = [
            (r.id, r.caller_hash, r.mode, r.model, r.provider, r.status, r.attempts,
             r.worker_id, r.http_status, r.error_type, r.stop_reason, r.input_tokens,
             r.output_tokens, r.served_provider, r.served_model, r.upstream_model,
             r.submitted_at, r.started_at, r.completed_at, 0, 1)
            for r in rows
        ]
        async with self._pool.acquire() as conn:
            await conn.copy_records_to_table("jobs", records=records, columns=_HISTORY_COLUMNS)

    async def release(self, job_id: uuid.UUID, attempts: int) -> None:
        """Back to pending: the job waits in a delay queue for its next attempt; the calls
        made so far count in its history."""
        await self._pool.execute(
            "UPDATE jobs SET status = 'pending', attempts = attempts + $2"
            " WHERE id = $1 AND status = 'processing'", job_id, attempts,
        )

    # --- sweeper ---------------------------------------------------------------------------

    async def sweep_expired(self, batch: int) -> int:
        """Delete one bounded batch of expired results in a short transaction."""
        status = await self._pool.execute(
            "DELETE FROM job_results WHERE job_id IN ("
            " SELECT job_id FROM job_results WHERE expires_at <= now()"
            " ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED)",
            batch,
        )
        return int(status.split()[-1])

    async def prune_history(self, older_than_s: float, batch: int) -> int:
        """Delete one bounded batch of finished history rows submitted before the retention
        window (oldest first, along the submitted_at index)."""
        status = await self._pool.execute(
            "DELETE FROM jobs WHERE id IN ("
            " SELECT id FROM jobs"
            " WHERE submitted_at < now() - make_interval(secs => $1)"
            " AND status IN ('completed', 'failed')"
            " ORDER BY submitted_at LIMIT $2 FOR UPDATE SKIP LOCKED)",
            older_than_s, batch,
        )
        return int(status.split()[-1])

    async def try_sweeper_lock(self, conn: asyncpg.Connection, key: int) -> bool:
        return bool(await conn.fetchval("SELECT pg_try_advisory_lock($1)", key))

    async def release_sweeper_lock(self, conn: asyncpg.Connection, key: int) -> None:
        await conn.execute("SELECT pg_advisory_unlock($1)", key)

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        async with self._pool.acquire() as conn:
            yield conn
