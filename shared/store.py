"""All SQL. The api, the workers and the reconciler talk to PostgreSQL only through this module.

The job row is the one source of truth for a job's life (status, lease, attempts); messages
only carry work. Connection-level failures are translated once, here, into `StoreUnavailable`,
which callers may retry; anything else is a bug or bad data and is not retried.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import asyncpg

from shared import webhooks
from shared.errors import Conflict, FerryError, InvalidRequest, RateLimited, Unavailable
from shared.jobs import FINAL_STATUSES, Mode, Status
from shared.logging import get_logger

log = get_logger("ferry.store")

ACQUIRE_TIMEOUT_S = 10.0
IDEMPOTENCY_WINDOW_S = 24 * 3600
JOB_DONE_CHANNEL = "ferry_job_done"  # NOTIFY payload: the id of a watched job that ended

# Failures of the connection or the server, not of the statement: worth trying again.
_TRANSIENT = (
    OSError, asyncio.TimeoutError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError, asyncpg.TooManyConnectionsError,
    asyncpg.exceptions.OperatorInterventionError,  # admin / crash shutdown of the server
    asyncpg.exceptions.TransactionRollbackError,  # serialization failure, deadlock
    # A new pool connection refused: the database was dropped or the role changed under a
    # running process. An operator's fix, but the callers' answer is the same: unavailable.
    asyncpg.InvalidCatalogNameError, asyncpg.InvalidAuthorizationSpecificationError,
)
# A value the database refuses (a NUL in text, an index row too large...): the member's fault.
_BAD_DATA = (asyncpg.DataError, asyncpg.exceptions.ProgramLimitExceededError,
             asyncpg.exceptions.CharacterNotInRepertoireError)


class StoreUnavailable(Unavailable):
    def __init__(self, message: str = "the job store is unavailable; retry later") -> None:
        super().__init__(message)


@contextmanager
def _translated() -> Iterator[None]:
    try:
        yield
    except _TRANSIENT as exc:
        raise StoreUnavailable() from exc


@dataclass(frozen=True, slots=True)
class NewJob:
    id: uuid.UUID
    caller_hash: bytes
    mode: Mode
    model: str
    provider: str
    ttl_seconds: int
    message: bytes  # the job message as published (kept until the job ends: the outbox)
    upstream_model: str | None = None
    request_id: str | None = None
    key_id: uuid.UUID | None = None
    max_pending: int | None = None  # the key's limit of unfinished async jobs
    webhook_endpoint_id: uuid.UUID | None = None  # announce the job's end there


@dataclass(frozen=True, slots=True)
class JobView:
    """What a poll sees. `body` is the stored result (message or error envelope), verbatim."""

    id: uuid.UUID
    status: Status
    model: str
    http_status: int | None
    body: str | None


ClaimState = Literal["claimed", "missing", "finished", "held", "parked"]


@dataclass(frozen=True, slots=True)
class Claim:
    """What claiming a job found. `claimed`: it is this worker's now, with a lease;
    `missing`: no such row (its submit was withdrawn, or history pruned); `finished`: done
    already; `held`: another worker's lease on it is still running; `parked`: waiting for a
    delayed retry that is not due yet."""

    state: ClaimState
    status: Status | None = None
    attempts: int = 0  # provider calls made for this job before this claim
    abandoned: int = 0  # times taken over from a worker that stopped under it
    holder: str | None = None
    lease_remaining_s: float = 0.0  # for `held`: how long the holder's lease still runs
    lease_until: datetime | None = None  # for `held`: changes when the holder extends it
    ttl_seconds: int = 0


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
    rate_limited: int = 0  # provider 429s met (not attempts)

    @property
    def usage(self) -> dict[str, int]:
        counts = {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
                  "cache_creation_input_tokens": self.cache_creation_input_tokens}
        return {k: v for k, v in counts.items() if v is not None}


@dataclass(frozen=True, slots=True)
class Finished:
    """A job this call finished. `delivery_id`: its webhook delivery, to be published."""

    delivery_id: uuid.UUID | None = None


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """A job's message as the outbox keeps it, and the lane it goes to (by its mode)."""

    job_id: uuid.UUID
    message: bytes
    mode: Mode


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
    request_id: str | None = None
    key_id: uuid.UUID | None = None


_HISTORY_COLUMNS = [
    "id", "caller_hash", "mode", "model", "provider", "status", "attempts", "worker_id",
    "http_status", "error_type", "stop_reason", "input_tokens", "output_tokens",
    "served_provider", "served_model", "upstream_model",
    "submitted_at", "started_at", "completed_at", "ttl_seconds", "deliveries", "request_id",
    "key_id",
]

# Jobs and their payloads in one statement (so one round trip, atomic without a transaction
# block): the payloads' foreign key is checked at the end of the statement, rows in place.
_INSERT_JOBS = (
    "WITH j AS (INSERT INTO jobs (id, caller_hash, mode, model, provider, ttl_seconds,"
    " upstream_model, request_id, key_id, webhook_endpoint_id) SELECT * FROM unnest("
    "$1::uuid[], $2::bytea[], $3::text[], $4::text[], $5::text[], $6::integer[], $7::text[],"
    " $8::text[], $9::uuid[], $10::uuid[]))"
    " INSERT INTO job_payloads (job_id, message) SELECT * FROM unnest($1::uuid[], $11::bytea[])"
)

# An asynchronous commit in one round trip: set_config(..., true) lasts for the statement's
# own transaction, and its commit is what reads the setting.
_MARK_PUBLISHED = (
    "WITH async_commit AS (SELECT set_config('synchronous_commit', 'off', true))"
    " UPDATE jobs SET published_at = now() FROM async_commit WHERE id = ANY($1::uuid[])"
)

# Take each job if it is waiting (and due), or if the lease of the worker that had it ran out.
# One round trip for any number of jobs: the CTE reads the rows under a lock (in id order, so
# two claimers of overlapping jobs never deadlock) and the UPDATE applies only where it may.
_CLAIM = """
WITH cur AS (
    SELECT id, status, worker_id, lease_until, not_before, attempts, abandoned, ttl_seconds,
           now() AS db_now
    FROM jobs WHERE id = ANY($1::uuid[]) ORDER BY id FOR UPDATE
), taken AS (
    UPDATE jobs j SET status = 'processing', worker_id = $2,
           lease_until = now() + make_interval(secs => $3),
           started_at = coalesce(j.started_at, now()), deliveries = j.deliveries + 1,
           abandoned = j.abandoned + (cur.status = 'processing')::int, not_before = NULL
    FROM cur
    WHERE j.id = cur.id AND (
        (cur.status = 'pending'
         AND (cur.not_before IS NULL OR cur.not_before <= now() + interval '1 second'))
        OR (cur.status = 'processing' AND cur.lease_until < now()))
    RETURNING j.id, j.abandoned
)
SELECT cur.*, taken.abandoned AS taken_abandoned FROM cur LEFT JOIN taken ON taken.id = cur.id
"""


# Jobs' ends, in one statement: each row (if not finished already) with its result and
# without its payload; a watched job's end is announced to the waiting poll. $15 picks the
# jobs that named a webhook endpoint (true) or the others (false). The others need nothing
# more: the statement commits on its own. Jobs with an endpoint are finished in a transaction
# with their deliveries (`_INSERT_RESULT_AND_DELIVERY`); a subquery says how the endpoint
# wants it announced: `off` (disabled or removed since), `full` (with the response), `slim`.
# Without $15, the statement names (in `later`) the unfinished jobs that have an endpoint.
_FINISH = f"""
WITH input AS (
    SELECT * FROM unnest($1::uuid[], $2::text[], $3::integer[], $4::smallint[], $5::text[],
                         $6::text[], $7::integer[], $8::integer[], $9::integer[],
                         $10::integer[], $11::text[], $12::text[], $13::text[],
                         $14::integer[])
        AS t(id, status, attempts, http_status, error_type, stop_reason, input_tokens,
             output_tokens, cache_creation_input_tokens, cache_read_input_tokens,
             served_provider, served_model, body, rate_limited)
), done AS (
    UPDATE jobs j SET status = i.status, attempts = j.attempts + i.attempts,
           rate_limited = j.rate_limited + i.rate_limited,
           http_status = i.http_status, error_type = i.error_type,
           stop_reason = i.stop_reason, input_tokens = i.input_tokens,
           output_tokens = i.output_tokens,
           cache_creation_input_tokens = i.cache_creation_input_tokens,
           cache_read_input_tokens = i.cache_read_input_tokens,
           served_provider = i.served_provider, served_model = i.served_model,
           lease_until = NULL, completed_at = now(),
           expires_at = now() + make_interval(secs => j.ttl_seconds)
    FROM input i
    WHERE j.id = i.id AND j.status IN ('pending', 'processing')
      AND (j.webhook_endpoint_id IS NOT NULL) = $15
    RETURNING j.id, j.expires_at, j.completed_at, j.model, j.request_id,
              j.webhook_endpoint_id,
              CASE WHEN j.watched THEN pg_notify('{JOB_DONE_CHANNEL}', j.id::text)
              END AS notified,
              CASE WHEN j.webhook_endpoint_id IS NOT NULL THEN (
                  SELECT CASE WHEN NOT e.enabled OR e.removed_at IS NOT NULL THEN 'off'
                              WHEN e.include_response THEN 'full' ELSE 'slim' END
                  FROM webhook_endpoints e WHERE e.id = j.webhook_endpoint_id) END AS announce
), result AS (
    INSERT INTO job_results (job_id, body, expires_at)
    SELECT d.id, i.body::json, d.expires_at FROM done d JOIN input i ON i.id = d.id
    WHERE d.webhook_endpoint_id IS NULL
    ON CONFLICT (job_id) DO NOTHING
), payload AS (
    DELETE FROM job_payloads p USING done d WHERE p.job_id = d.id
)
SELECT *, false AS later FROM done
UNION ALL
SELECT j.id, NULL, NULL, NULL, NULL, j.webhook_endpoint_id, NULL, NULL, true
FROM jobs j JOIN input i ON i.id = j.id
WHERE NOT $15 AND j.webhook_endpoint_id IS NOT NULL AND j.status IN ('pending', 'processing')
"""
# The result and the webhook delivery in one statement: no round trip more than without one.
_INSERT_RESULT_AND_DELIVERY = """
WITH result AS (
    INSERT INTO job_results (job_id, body, expires_at) VALUES ($1, $2, $3)
    ON CONFLICT (job_id) DO NOTHING
)
INSERT INTO webhook_deliveries (id, job_id, endpoint_id, event_type, payload, state,
                                last_error, finished_at, created_at)
VALUES ($4, $1, $5, $6, $7, $8, $9, CASE WHEN $8 = 'failed' THEN now() END, now())
ON CONFLICT (job_id) DO NOTHING
"""


class Store:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @classmethod
    async def connect(cls, dsn: str, *, min_size: int = 2, max_size: int = 20,
                      timeout_s: float = 10.0) -> Store:
        """Raises StoreUnavailable when the database cannot be reached."""
        try:
            pool = await asyncpg.create_pool(dsn, min_size=min_size, max_size=max_size,
                                             timeout=timeout_s, reset=_keep_session)
        except _TRANSIENT as exc:
            raise StoreUnavailable(f"cannot reach the database ({type(exc).__name__}): check "
                                   "DATABASE_URL") from exc
        except asyncpg.InvalidCatalogNameError:
            raise StoreUnavailable("the database in DATABASE_URL does not exist: `ferry "
                                   "migrate` creates it") from None
        except (asyncpg.InvalidAuthorizationSpecificationError,
                asyncpg.InvalidPasswordError):
            raise StoreUnavailable("the database refused the user or password in "
                                   "DATABASE_URL") from None
        return cls(pool)

    async def close(self) -> None:
        await self._pool.close()

    @asynccontextmanager
    async def _conn(self) -> AsyncIterator[asyncpg.Connection]:
        with _translated():
            async with self._pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
                yield conn

    async def ping(self) -> None:
        async with self._conn() as conn:
            await conn.fetchval("SELECT 1")

    async def applied_migrations(self) -> set[int]:
        """The migration versions applied (none on an empty database)."""
        async with self._conn() as conn:
            exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
            if not exists:
                return set()
            return {r["version"] for r in await conn.fetch(
                "SELECT version FROM schema_migrations")}

    # --- api: submits ----------------------------------------------------------------------

    async def insert_jobs(self, jobs: list[NewJob]) -> list[FerryError | None]:
        """Commit new jobs (unpublished: the outbox) in one transaction. A member the
        database refuses fails alone (the batch is then inserted row by row), as does one over
        its key's limit of unfinished jobs. Returns a per-job error (None where the job was
        stored); raises StoreUnavailable when nothing could be stored."""
        try:
            async with self._conn() as conn:
                if not any(_limited(j) for j in jobs):
                    await self._insert(conn, jobs)
                    return [None] * len(jobs)
                async with conn.transaction():
                    refused = await _over_pending(conn, jobs)
                    await self._insert(conn, [j for i, j in enumerate(jobs) if i not in refused])
            return [refused.get(i) for i in range(len(jobs))]
        except _BAD_DATA:
            if len(jobs) == 1:
                return [_unstorable()]
        results: list[FerryError | None] = []
        for job in jobs:
            try:
                async with self._conn() as conn, conn.transaction():
                    refused = await _over_pending(conn, [job])
                    if not refused:
                        await self._insert(conn, [job])
                results.append(refused.get(0))
            except _BAD_DATA:
                results.append(_unstorable())
        return results

    @staticmethod
    async def _insert(conn: asyncpg.Connection, jobs: list[NewJob]) -> None:
        if not jobs:
            return
        await conn.execute(
            _INSERT_JOBS, [j.id for j in jobs], [j.caller_hash for j in jobs],
            [j.mode for j in jobs], [j.model for j in jobs], [j.provider for j in jobs],
            [j.ttl_seconds for j in jobs], [j.upstream_model for j in jobs],
            [j.request_id for j in jobs], [j.key_id for j in jobs],
            [j.webhook_endpoint_id for j in jobs], [j.message for j in jobs],
        )

    async def insert_idempotent(self, job: NewJob, key: str, body_hash: bytes
                                ) -> tuple[uuid.UUID, Status, bool]:
        """Commit `job` unless this caller used `key` in the last 24 h: then (that job's id,
        its status, False). The same key with another request is a Conflict."""
        async with self._conn() as conn, conn.transaction():
            await conn.execute(
                "DELETE FROM idempotency_keys WHERE caller_hash = $1 AND key = $2"
                " AND created_at < now() - make_interval(secs => $3)",
                job.caller_hash, key, float(IDEMPOTENCY_WINDOW_S))
            row = await conn.fetchrow(
                "INSERT INTO idempotency_keys (caller_hash, key, body_hash, job_id)"
                " VALUES ($1, $2, $3, $4) ON CONFLICT (caller_hash, key) DO NOTHING"
                " RETURNING job_id", job.caller_hash, key, body_hash, job.id)
            if row is None:
                existing = await conn.fetchrow(
                    "SELECT k.body_hash, k.job_id, j.status FROM idempotency_keys k"
                    " JOIN jobs j ON j.id = k.job_id WHERE k.caller_hash = $1 AND k.key = $2",
                    job.caller_hash, key)
                if existing is None:  # its job was withdrawn in between: a plain retry helps
                    raise StoreUnavailable("the idempotency key is being released; retry")
                if bytes(existing["body_hash"]) != body_hash:
                    raise Conflict(f"Idempotency-Key {key!r} was already used with a different"
                                   " request in the last 24 hours")
                return existing["job_id"], existing["status"], False
            refused = await _over_pending(conn, [job])
            if refused:
                raise refused[0]
            await self._insert(conn, [job])  # the key's reference is checked at commit
        return job.id, "pending", True

    async def mark_published(self, ids: list[uuid.UUID]) -> None:
        """Bookkeeping that need not wait for the disk: a mark lost in a database crash
        makes the reconciler publish the job again, which its row makes harmless."""
        async with self._conn() as conn:
            await conn.execute(_MARK_PUBLISHED, ids)

    async def withdraw(self, ids: list[uuid.UUID]) -> None:
        """Remove submits whose publish failed (their client gets an error), unless a worker
        already took one (the message did get through)."""
        async with self._conn() as conn:
            await conn.execute(
                "DELETE FROM jobs WHERE id = ANY($1::uuid[]) AND status = 'pending'", ids)

    async def get_job(self, job_id: uuid.UUID, caller_hash: bytes) -> JobView | None:
        """The job as its submitter may see it; None if unknown, someone else's, or expired."""
        async with self._conn() as conn:
            row = await conn.fetchrow(
                "SELECT j.status, j.model, j.http_status, r.body"
                " FROM jobs j LEFT JOIN job_results r ON r.job_id = j.id"
                " WHERE j.id = $1 AND j.caller_hash = $2 AND j.mode = 'async'"
                " AND (j.expires_at IS NULL OR j.expires_at > now())",
                job_id, caller_hash,
            )
        if row is None:
            return None
        status = row["status"]
        if status in ("completed", "failed") and row["body"] is None:
            return None  # result already swept
        return JobView(job_id, status, row["model"], row["http_status"], row["body"])

    async def watch(self, job_id: uuid.UUID, caller_hash: bytes) -> None:
        """Somebody waits for this job: its end will be announced on JOB_DONE_CHANNEL. Read
        the job again afterwards: an end committed before this is not announced."""
        async with self._conn() as conn:
            await conn.execute(
                "UPDATE jobs SET watched = true WHERE id = $1 AND caller_hash = $2"
                " AND NOT watched AND status IN ('pending', 'processing')", job_id, caller_hash)

    async def unfinished_counts(self) -> dict[str, int]:
        async with self._conn() as conn:
            rows = await conn.fetch(
                "SELECT status, count(*) AS n FROM jobs"
                " WHERE completed_at IS NULL GROUP BY status")
        counts = {"pending": 0, "processing": 0}
        counts.update({r["status"]: r["n"] for r in rows})
        return counts

    # --- worker ----------------------------------------------------------------------------

    async def claim(self, job_id: uuid.UUID, worker_id: str, lease_s: float) -> Claim:
        [claim] = await self.claim_jobs([job_id], worker_id, lease_s)
        return claim

    async def claim_jobs(self, job_ids: list[uuid.UUID], worker_id: str,
                         lease_s: float) -> list[Claim]:
        """Claim several jobs in one statement: what each claim found, in order."""
        async with self._conn() as conn:
            rows = await conn.fetch(_CLAIM, job_ids, worker_id, float(lease_s))
        found = {row["id"]: _claim_of(row) for row in rows}
        return [found.get(job_id, _MISSING) for job_id in job_ids]

    async def extend_leases(self, ids: list[uuid.UUID], worker_id: str,
                            lease_s: float) -> set[uuid.UUID]:
        """Extend this worker's leases; returns the jobs it no longer holds."""
        async with self._conn() as conn:
            rows = await conn.fetch(
                "UPDATE jobs SET lease_until = now() + make_interval(secs => $3)"
                " WHERE id = ANY($1::uuid[]) AND worker_id = $2 AND status = 'processing'"
                " RETURNING id", ids, worker_id, float(lease_s))
        return set(ids) - {r["id"] for r in rows}

    async def finish(self, job_id: uuid.UUID, outcome: Outcome) -> bool:
        """`finish_job`, saying only whether this call finished the job."""
        return await self.finish_job(job_id, outcome) is not None

    async def finish_job(self, job_id: uuid.UUID, outcome: Outcome) -> Finished | None:
        """Store the result and the history in one transaction, and drop the job's payload;
        for a job that named a webhook endpoint, its delivery too (the webhook outbox: no
        crash after this commit can lose it). Idempotent: a job that is already finished
        keeps its first result, and this returns None."""
        [finished] = await self.finish_jobs([(job_id, outcome)])
        if isinstance(finished, Exception):
            raise finished
        return finished

    async def finish_jobs(self, items: list[tuple[uuid.UUID, Outcome]]
                          ) -> list[Finished | None | Exception]:
        """`finish_job` for several jobs: one statement for the jobs that named no webhook
        endpoint, and one transaction for those that did, with their deliveries. A member
        that cannot be stored (bad data, a bug) fails alone: the batch is then stored job by
        job, and that member's error is its result. Raises StoreUnavailable when the
        database is away."""
        try:
            return list(await self._finish_batch(items))
        except StoreUnavailable:
            raise
        except Exception as exc:
            if len(items) == 1:
                return [exc]
        results: list[Finished | None | Exception] = []
        for item in items:
            try:
                results.extend(await self._finish_batch([item]))
            except StoreUnavailable:
                raise
            except Exception as exc:
                results.append(exc)
        return results

    async def _finish_batch(self, items: list[tuple[uuid.UUID, Outcome]]
                            ) -> list[Finished | None]:
        first: dict[uuid.UUID, Outcome] = {}
        for job_id, outcome in items:
            first.setdefault(job_id, outcome)  # a repeat in one batch: the first one counts
        finished: dict[uuid.UUID, Finished] = {}
        async with self._conn() as conn:
            # Jobs without an endpoint in one statement (no transaction round trips); those
            # with one, if any, in a transaction with their deliveries.
            rows = await _finish_rows(conn, first, hooked=False)
            later = {row["id"]: first[row["id"]] for row in rows if row["later"]}
            finished.update((row["id"], Finished()) for row in rows if not row["later"])
            if later:
                async with conn.transaction():
                    for row in await _finish_rows(conn, later, hooked=True):
                        job_id = row["id"]
                        finished[job_id] = Finished(
                            await _insert_with_delivery(conn, job_id, later[job_id], row))
        return [finished.pop(job_id, None) for job_id, _ in items]  # a repeat finds None

    async def park(self, job_id: uuid.UUID, worker_id: str, attempts: int,
                   delay_s: float, rate_limited: int = 0) -> None:
        """Back to pending until its delayed retry is due; the calls made so far count (and
        the 429s met, apart)."""
        async with self._conn() as conn:
            await conn.execute(
                "UPDATE jobs SET status = 'pending', attempts = attempts + $3,"
                " rate_limited = rate_limited + $5,"
                " lease_until = NULL, published_at = now(),"
                " not_before = now() + make_interval(secs => $4)"
                " WHERE id = $1 AND worker_id = $2 AND status = 'processing'",
                job_id, worker_id, attempts, float(delay_s), rate_limited)

    async def release(self, job_id: uuid.UUID, worker_id: str, attempts: int) -> None:
        """Hand a job back (the worker is stopping): pending again, for the next worker."""
        async with self._conn() as conn:
            await conn.execute(
                "UPDATE jobs SET status = 'pending', attempts = attempts + $3,"
                " lease_until = NULL WHERE id = $1 AND worker_id = $2"
                " AND status = 'processing'", job_id, worker_id, attempts)

    async def record_history(self, rows: list[HistoryRow]) -> int:
        """Bulk-insert finished interactive requests (COPY: one round trip per batch). A row
        the database refuses is dropped alone; returns how many were dropped."""
        records = [_history_record(r) for r in rows]
        try:
            await self._copy_history(records)
            return 0
        except (*_BAD_DATA, asyncpg.UniqueViolationError):
            if len(records) == 1:
                return 1
        dropped = 0
        for record in records:
            try:
                await self._copy_history([record])
            except (*_BAD_DATA, asyncpg.UniqueViolationError):
                dropped += 1
        return dropped

    async def _copy_history(self, records: list[tuple[object, ...]]) -> None:
        # Best effort, so an asynchronous commit: it need not wait for the disk.
        async with self._conn() as conn, conn.transaction():
            await conn.execute("SET LOCAL synchronous_commit TO off")
            await conn.copy_records_to_table("jobs", records=records, columns=_HISTORY_COLUMNS)

    # --- reconciler ------------------------------------------------------------------------

    # Each release makes jobs pending and unpublished; the reconciler publishes them at once
    # (and, should that fail, its scan for unpublished jobs does later).

    async def recover_expired_leases(self, grace_s: float, limit: int) -> list[uuid.UUID]:
        """Jobs whose worker stopped renewing its lease: pending again, to be republished."""
        return await self._release(
            "UPDATE jobs SET status = 'pending', lease_until = NULL, published_at = NULL,"
            " abandoned = abandoned + 1 WHERE id IN (SELECT id FROM jobs"
            " WHERE completed_at IS NULL AND status = 'processing'"
            " AND lease_until < now() - make_interval(secs => $1)"
            " LIMIT $2 FOR UPDATE SKIP LOCKED) RETURNING id", grace_s, limit)

    async def release_overdue_parked(self, grace_s: float, limit: int) -> list[uuid.UUID]:
        """Parked jobs whose delayed message never came back: to be republished."""
        return await self._release(
            "UPDATE jobs SET not_before = NULL, published_at = NULL WHERE id IN ("
            " SELECT id FROM jobs WHERE completed_at IS NULL AND status = 'pending'"
            " AND not_before < now() - make_interval(secs => $1)"
            " LIMIT $2 FOR UPDATE SKIP LOCKED) RETURNING id", grace_s, limit)

    async def release_stale_pending(self, older_than_s: float, limit: int,
                                    mode: Mode = "async") -> list[uuid.UUID]:
        """Pending jobs of a lane (`async` or `batch`) published long ago and never picked up
        (their message was lost: the caller checked that lane's queue is empty)."""
        return await self._release(
            "UPDATE jobs SET published_at = NULL WHERE id IN ("
            " SELECT id FROM jobs WHERE completed_at IS NULL AND status = 'pending'"
            " AND not_before IS NULL"
            " AND mode = $3 AND published_at < now() - make_interval(secs => $1)"
            " LIMIT $2 FOR UPDATE SKIP LOCKED) RETURNING id", older_than_s, limit, mode)

    async def _release(self, sql: str, seconds: float, limit: int,
                       *more: object) -> list[uuid.UUID]:
        async with self._conn() as conn:
            return [r["id"] for r in await conn.fetch(sql, float(seconds), limit, *more)]

    async def messages(self, ids: list[uuid.UUID]) -> list[StoredMessage]:
        """The stored messages of these jobs (those still unfinished)."""
        async with self._conn() as conn:
            rows = await conn.fetch(
                "SELECT p.job_id AS id, p.message, j.mode FROM job_payloads p"
                " JOIN jobs j ON j.id = p.job_id WHERE p.job_id = ANY($1::uuid[])", ids)
        return [StoredMessage(r["id"], bytes(r["message"]), r["mode"]) for r in rows]

    async def message(self, job_id: uuid.UUID) -> bytes | None:
        """One job's stored message; None once it has ended (or never existed)."""
        async with self._conn() as conn:
            data = await conn.fetchval("SELECT message FROM job_payloads WHERE job_id = $1",
                                       job_id)
        return None if data is None else bytes(data)

    async def unpublished(self, older_than_s: float, limit: int) -> list[StoredMessage]:
        """Pending jobs with no confirmed message, committed more than `older_than_s` ago
        (the api stopped between commit and publish), with their messages. A batch's requests
        are left to the api publishing them while it makes progress (a 100,000-request batch
        takes a while to publish)."""
        async with self._conn() as conn:
            rows = await conn.fetch(
                "SELECT j.id, p.message, j.mode FROM jobs j"
                " JOIN job_payloads p ON p.job_id = j.id"
                " WHERE j.completed_at IS NULL AND j.status = 'pending' AND j.published_at IS NULL"
                " AND j.submitted_at < now() - make_interval(secs => $1)"
                " AND NOT EXISTS (SELECT 1 FROM batches b WHERE b.id = j.batch_id"
                "  AND b.publishing_at > now() - make_interval(secs => $1))"
                " ORDER BY j.submitted_at LIMIT $2", float(older_than_s), limit)
        return [StoredMessage(r["id"], bytes(r["message"]), r["mode"]) for r in rows]

    async def job_status(self, job_id: uuid.UUID) -> tuple[Status, int] | None:
        """(status, deliveries), for the dead-letter drain's message."""
        async with self._conn() as conn:
            row = await conn.fetchrow("SELECT status, deliveries FROM jobs WHERE id = $1",
                                      job_id)
        return None if row is None else (row["status"], row["deliveries"])

    # --- sweeper ---------------------------------------------------------------------------

    async def sweep_expired(self, batch: int) -> int:
        """Delete one bounded batch of expired results in a short transaction."""
        async with self._conn() as conn:
            status = await conn.execute(
                "DELETE FROM job_results WHERE job_id IN ("
                " SELECT job_id FROM job_results WHERE expires_at <= now()"
                " ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED)", batch)
        return _count(status)

    async def sweep_idempotency_keys(self, batch: int) -> int:
        async with self._conn() as conn:
            status = await conn.execute(
                "DELETE FROM idempotency_keys WHERE (caller_hash, key) IN ("
                " SELECT caller_hash, key FROM idempotency_keys"
                " WHERE created_at < now() - make_interval(secs => $1)"
                " LIMIT $2 FOR UPDATE SKIP LOCKED)", float(IDEMPOTENCY_WINDOW_S), batch)
        return _count(status)

    async def prune_history(self, older_than_s: float, batch: int) -> int:
        """Delete one bounded batch of finished history rows submitted before the retention
        window (oldest first, along the submitted_at index)."""
        async with self._conn() as conn:
            status = await conn.execute(
                "DELETE FROM jobs WHERE id IN ("
                " SELECT id FROM jobs"
                " WHERE submitted_at < now() - make_interval(secs => $1)"
                " AND status IN ('completed', 'failed', 'canceled', 'expired')"
                " ORDER BY submitted_at LIMIT $2 FOR UPDATE SKIP LOCKED)",
                older_than_s, batch)
        return _count(status)

    @asynccontextmanager
    async def advisory_lock(self, key: int) -> AsyncIterator[bool]:
        """A session-level advisory lock held for the block: True if this process got it
        (one of any number of sweeper/reconciler replicas does the work)."""
        async with self._conn() as conn:
            got = bool(await conn.fetchval("SELECT pg_try_advisory_lock($1)", key))
            try:
                yield got
            finally:
                if got:
                    try:
                        with _translated():
                            await conn.execute("SELECT pg_advisory_unlock($1)", key)
                    except BaseException:
                        # Pooled connections are not reset: end the session, and its lock.
                        conn.terminate()
                        raise


_MISSING = Claim("missing")


def _claim_of(row: asyncpg.Record) -> Claim:
    status = row["status"]
    if row["taken_abandoned"] is not None:
        return Claim("claimed", "processing", row["attempts"], row["taken_abandoned"],
                     ttl_seconds=row["ttl_seconds"])
    if status in FINAL_STATUSES:
        return Claim("finished", status)
    if status == "pending":
        return Claim("parked", status, row["attempts"])
    lease_until = row["lease_until"]
    remaining = (lease_until - row["db_now"]).total_seconds() if lease_until else 0.0
    return Claim("held", status, row["attempts"], row["abandoned"], row["worker_id"],
                 remaining, lease_until)


async def _keep_session(conn: asyncpg.Connection) -> None:
    """A pooled connection goes back as it is, saving a round trip per checkout: asyncpg
    rolls back a transaction left open itself, and Ferry keeps no other session state on
    pooled connections (LISTEN has a connection of its own; `advisory_lock` unlocks, or ends
    the session when it cannot)."""


async def _finish_rows(conn: asyncpg.Connection, jobs: dict[uuid.UUID, Outcome], *,
                       hooked: bool) -> list[asyncpg.Record]:
    outcomes = list(jobs.values())
    return await conn.fetch(
        _FINISH, list(jobs), [o.status for o in outcomes], [o.attempts for o in outcomes],
        [o.http_status for o in outcomes], [o.error_type for o in outcomes],
        [o.stop_reason for o in outcomes], [o.input_tokens for o in outcomes],
        [o.output_tokens for o in outcomes], [o.cache_creation_input_tokens for o in outcomes],
        [o.cache_read_input_tokens for o in outcomes], [o.served_provider for o in outcomes],
        [o.served_model for o in outcomes], [o.body.decode() for o in outcomes],
        [o.rate_limited for o in outcomes], hooked)


async def _insert_with_delivery(conn: asyncpg.Connection, job_id: uuid.UUID,
                                outcome: Outcome, row: asyncpg.Record) -> uuid.UUID | None:
    """The result and the job's webhook delivery. An endpoint disabled or removed since the
    submit gets a delivery that is failed at once (reported, never sent). Returns the id of
    a delivery to publish."""
    delivery_id = uuid.uuid4()
    off = row["announce"] != "full" and row["announce"] != "slim"
    body = webhooks.payload(
        job_id=job_id, status=outcome.status, http_status=outcome.http_status,
        ended_at=row["completed_at"], expires_at=row["expires_at"], model=row["model"],
        request_id=row["request_id"],
        response=outcome.body if row["announce"] == "full" else None)
    await conn.execute(
        _INSERT_RESULT_AND_DELIVERY, job_id, outcome.body.decode(), row["expires_at"],
        delivery_id, row["webhook_endpoint_id"], webhooks.event_of(outcome.status),
        None if off else body, "failed" if off else "pending",
        "the endpoint was disabled or removed before the job ended" if off else None)
    return None if off else delivery_id

async def _over_pending(conn: asyncpg.Connection, jobs: list[NewJob]) -> dict[int, FerryError]:
    """The members a key's limit of unfinished async jobs refuses. The keys' rows are locked
    until the transaction ends, so concurrent submits (on any api) count one after another."""
    limited = sorted({j.key_id for j in jobs if j.key_id is not None and _limited(j)})
    if not limited:
        return {}
    await conn.execute("SELECT 1 FROM api_keys WHERE id = ANY($1::uuid[]) ORDER BY id"
                       " FOR UPDATE", limited)
    rows = await conn.fetch(
        "SELECT key_id, count(*) AS n FROM jobs WHERE key_id = ANY($1::uuid[])"
        " AND completed_at IS NULL AND mode = 'async' GROUP BY key_id", limited)
    counts = {r["key_id"]: r["n"] for r in rows}
    refused: dict[int, FerryError] = {}
    for i, job in enumerate(jobs):
        if job.key_id is None or not job.max_pending:
            continue
        if counts.get(job.key_id, 0) >= job.max_pending:
            refused[i] = RateLimited(
                f"the API key has {job.max_pending} async jobs unfinished, its limit; "
                "submit more once some have finished", headers={"retry-after": "5"})
        else:
            counts[job.key_id] = counts.get(job.key_id, 0) + 1
    return refused


def _limited(job: NewJob) -> bool:
    """Whether the job's key caps its unfinished async jobs."""
    return job.key_id is not None and bool(job.max_pending)


def _count(status: str) -> int:
    return int(status.split()[-1])


def _unstorable() -> InvalidRequest:
    return InvalidRequest("the request holds a value the job store cannot keep")


def _history_record(r: HistoryRow) -> tuple[object, ...]:
    return (r.id, r.caller_hash, r.mode, r.model, r.provider, r.status, r.attempts,
            r.worker_id, r.http_status, r.error_type, r.stop_reason, r.input_tokens,
            r.output_tokens, r.served_provider, r.served_model, r.upstream_model,
            r.submitted_at, r.started_at, r.completed_at, 0, 1, r.request_id, r.key_id)


def body_hash(*parts: bytes) -> bytes:
    """What an idempotent submit is compared by."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.digest()
