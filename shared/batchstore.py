"""All SQL about Message Batches. A batch is a row in `batches`; each of its requests is a job
(mode `batch`) with its place (`batch_index`) and `custom_id`, run by the workers like any
job. A batch's request counts are read from its jobs while it runs, and written into its row
once it has ended (then reads cost one row).

Creating a batch writes its rows as the body is read, in one transaction on a connection of its
own (a 256 MB upload must not hold a connection of the shared pool), with COPY."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime

import asyncpg

from shared.jobs import parse_prefixed_id
from shared.store import Store, _count, _translated

BATCH_ID_PREFIX = "msgbatch_"
COPY_ROWS = 1000
# jobs.status → request_counts
_COUNT_OF = {"pending": "processing", "processing": "processing", "completed": "succeeded",
             "failed": "errored", "canceled": "canceled", "expired": "expired"}
_BATCH_COLUMNS = ("id, request_count, created_at, expires_at, cancel_initiated_at, ended_at,"
                  " succeeded, errored, canceled, expired")
_JOB_COLUMNS = ["id", "caller_hash", "mode", "model", "provider", "ttl_seconds",
                "upstream_model", "request_id", "key_id", "batch_id", "batch_index",
                "custom_id", "status", "http_status", "error_type", "completed_at",
                "expires_at", "published_at"]


def format_batch_id(batch_id: uuid.UUID) -> str:
    return BATCH_ID_PREFIX + batch_id.hex


def parse_batch_id(text: str) -> uuid.UUID | None:
    return parse_prefixed_id(text, BATCH_ID_PREFIX)


@dataclass(frozen=True, slots=True)
class BatchView:
    id: uuid.UUID
    request_count: int
    created_at: datetime
    expires_at: datetime
    cancel_initiated_at: datetime | None
    ended_at: datetime | None
    counts: dict[str, int]

    @property
    def processing_status(self) -> str:
        if self.ended_at is not None:
            return "ended"
        return "canceling" if self.cancel_initiated_at is not None else "in_progress"


@dataclass(frozen=True, slots=True)
class ResultRow:
    index: int
    custom_id: str
    status: str
    body: str | None


@dataclass(slots=True)
class BatchJob:
    """One request of a batch being created. `message`: the job message (None when the request
    is errored before running, with its error envelope as `error_body`)."""

    id: uuid.UUID
    index: int
    custom_id: str
    model: str
    provider: str
    upstream_model: str | None
    message: bytes | None
    error_body: bytes | None = None
    http_status: int | None = None
    error_type: str | None = None


@dataclass
class BatchWriter:
    """Rows of a batch being created, written in COPY chunks inside one transaction."""

    conn: asyncpg.Connection
    batch_id: uuid.UUID
    caller_hash: bytes
    key_id: uuid.UUID | None
    request_id: str | None
    ttl_s: int
    now: datetime
    pending: list[BatchJob] = field(default_factory=list)
    count: int = 0
    runnable: int = 0

    async def add(self, job: BatchJob) -> None:
        self.pending.append(job)
        self.count += 1
        if len(self.pending) >= COPY_ROWS:
            await self.flush()

    async def flush(self) -> None:
        jobs, self.pending = self.pending, []
        if not jobs:
            return
        expires = self.now.timestamp() + self.ttl_s
        expires_at = datetime.fromtimestamp(expires, tz=self.now.tzinfo)
        records = []
        for j in jobs:
            errored = j.message is None
            records.append((
                j.id, self.caller_hash, "batch", j.model, j.provider, self.ttl_s,
                j.upstream_model, self.request_id, self.key_id, self.batch_id, j.index,
                j.custom_id, "failed" if errored else "pending",
                j.http_status if errored else None, j.error_type if errored else None,
                self.now if errored else None, expires_at if errored else None, None))
        with _translated():
            await self.conn.copy_records_to_table("jobs", records=records, columns=_JOB_COLUMNS)
            runnable = [(j.id, j.message) for j in jobs if j.message is not None]
            self.runnable += len(runnable)
            if runnable:
                await self.conn.copy_records_to_table("job_payloads", records=runnable,
                                                      columns=["job_id", "message"])
            errored_rows = [(j.id, (j.error_body or b"").decode(), expires_at)
                            for j in jobs if j.message is None]
            if errored_rows:
                await self.conn.copy_records_to_table("job_results", records=errored_rows,
                                                      columns=["job_id", "body", "expires_at"])


class BatchStore:
    def __init__(self, store: Store, dsn: str = "") -> None:
        self._store = store
        self._dsn = dsn

    # --- create ------------------------------------------------------------------------------

    @asynccontextmanager
    async def creating(self, caller_hash: bytes, key_id: uuid.UUID | None,
                       request_id: str | None, ttl_s: int, expiry_s: float,
                       connect_timeout_s: float = 10.0) -> AsyncIterator[BatchWriter]:
        """A writer for a new batch; its rows are committed when the block ends without an
        exception (then the batch row is written last, with its count), else none are."""
        with _translated():
            conn = await asyncpg.connect(self._dsn, timeout=connect_timeout_s)
        try:
            with _translated():
                tx = conn.transaction()
                await tx.start()
                now = await conn.fetchval("SELECT now()")
            writer = BatchWriter(conn, uuid.uuid4(), caller_hash, key_id, request_id, ttl_s,
                                 now)
            try:
                yield writer
                with _translated():
                    await writer.flush()
                    # publishing_at: the commit's time, not the transaction's start (a
                    # create can take minutes), as the api starts publishing right after.
                    await conn.execute(
                        "INSERT INTO batches (id, caller_hash, key_id, request_count,"
                        " created_at, expires_at, request_id, publishing_at)"
                        " VALUES ($1, $2, $3, $4, $5::timestamptz,"
                        " $5::timestamptz + make_interval(secs => $6), $7, clock_timestamp())",
                        writer.batch_id, caller_hash, key_id, writer.count, now,
                        float(expiry_s), request_id)
                    await tx.commit()
            except BaseException:
                if not conn.is_closed():
                    with _translated():
                        await tx.rollback()
                raise
        finally:
            conn.terminate() if conn.is_closed() else await conn.close()

    async def unpublished(self, batch_id: uuid.UUID, after_index: int,
                          limit: int) -> list[tuple[int, uuid.UUID]]:
        """(index, job id) of the batch's requests never confirmed by the broker, in order."""
        async with self._store._conn() as conn:
            rows = await conn.fetch(
                "SELECT batch_index, id FROM jobs WHERE batch_id = $1 AND batch_index > $2"
                " AND status = 'pending' AND published_at IS NULL ORDER BY batch_index"
                " LIMIT $3", batch_id, after_index, limit)
        return [(r["batch_index"], r["id"]) for r in rows]

    async def published_some(self, batch_id: uuid.UUID, job_ids: list[uuid.UUID]) -> None:
        """Mark requests published, and the batch's publisher as making progress."""
        async with self._store._conn() as conn, conn.transaction():
            await conn.execute("UPDATE jobs SET published_at = now() WHERE id = ANY($1::uuid[])",
                               job_ids)
            await conn.execute("UPDATE batches SET publishing_at = now() WHERE id = $1",
                               batch_id)

    # --- read --------------------------------------------------------------------------------

    async def get(self, batch_id: uuid.UUID, caller_hash: bytes) -> BatchView | None:
        async with self._store._conn() as conn:
            row = await conn.fetchrow(
                f"SELECT {_BATCH_COLUMNS} FROM batches WHERE id = $1 AND caller_hash = $2",
                batch_id, caller_hash)
            if row is None:
                return None
            return await _view(conn, row)

    async def page(self, caller_hash: bytes, limit: int, after: uuid.UUID | None,
                   before: uuid.UUID | None) -> tuple[list[BatchView], bool]:
        """A page of the caller's batches, newest first; and whether more follow (past the
        last one, or before the first one when paging back with `before`)."""
        async with self._store._conn() as conn:
            if before is not None:
                rows = await conn.fetch(
                    f"SELECT {_BATCH_COLUMNS} FROM batches b WHERE caller_hash = $1 AND"
                    " (created_at, id) > (SELECT created_at, id FROM batches WHERE id = $2)"
                    " ORDER BY created_at, id LIMIT $3", caller_hash, before, limit + 1)
                more = len(rows) > limit
                rows = list(reversed(rows[:limit]))
            else:
                rows = await conn.fetch(
                    f"SELECT {_BATCH_COLUMNS} FROM batches WHERE caller_hash = $1 AND"
                    " ($2::uuid IS NULL OR (created_at, id) <"
                    " (SELECT created_at, id FROM batches WHERE id = $2))"
                    " ORDER BY created_at DESC, id DESC LIMIT $3", caller_hash, after, limit + 1)
                more = len(rows) > limit
                rows = rows[:limit]
            return [await _view(conn, row) for row in rows], more

    async def exists(self, batch_id: uuid.UUID, caller_hash: bytes) -> bool:
        async with self._store._conn() as conn:
            return bool(await conn.fetchval(
                "SELECT true FROM batches WHERE id = $1 AND caller_hash = $2",
                batch_id, caller_hash))

    async def results(self, batch_id: uuid.UUID, after_index: int,
                      limit: int) -> list[ResultRow]:
        async with self._store._conn() as conn:
            rows = await conn.fetch(
                "SELECT j.batch_index, j.custom_id, j.status, r.body::text AS body"
                " FROM jobs j LEFT JOIN job_results r ON r.job_id = j.id"
                " WHERE j.batch_id = $1 AND j.batch_index > $2"
                " ORDER BY j.batch_index LIMIT $3", batch_id, after_index, limit)
        return [ResultRow(r["batch_index"], r["custom_id"], r["status"], r["body"])
                for r in rows]

    # --- change ------------------------------------------------------------------------------

    async def cancel(self, batch_id: uuid.UUID, caller_hash: bytes) -> BatchView | None:
        """Requests not started end `canceled`; running ones finish. None: no such batch."""
        async with self._store._conn() as conn, conn.transaction():
            row = await conn.fetchrow(
                "UPDATE batches SET cancel_initiated_at = coalesce(cancel_initiated_at, now())"
                " WHERE id = $1 AND caller_hash = $2 AND ended_at IS NULL RETURNING id",
                batch_id, caller_hash)
            if row is not None:
                await conn.execute(_end_unstarted(
                    "canceled", "batch_id = $1 AND status = 'pending'"), batch_id)
            row = await conn.fetchrow(
                f"SELECT {_BATCH_COLUMNS} FROM batches WHERE id = $1 AND caller_hash = $2",
                batch_id, caller_hash)
            return None if row is None else await _view(conn, row)

    async def delete(self, batch_id: uuid.UUID, caller_hash: bytes) -> bool:
        """Delete an ended batch and its results (its requests stay in the job history)."""
        async with self._store._conn() as conn, conn.transaction():
            deleted = await conn.fetchval(
                "DELETE FROM batches WHERE id = $1 AND caller_hash = $2"
                " AND ended_at IS NOT NULL RETURNING true", batch_id, caller_hash)
            if deleted:
                await conn.execute(
                    "DELETE FROM job_results WHERE job_id IN"
                    " (SELECT id FROM jobs WHERE batch_id = $1)", batch_id)
        return bool(deleted)

    # --- reconciler and sweeper --------------------------------------------------------------

    async def expire_due(self, limit: int) -> int:
        """Requests of batches past their expiry that never started end `expired`."""
        async with self._store._conn() as conn:
            status = await conn.execute(_end_unstarted(
                "expired", "id IN (SELECT j.id FROM batches b JOIN jobs j ON j.batch_id = b.id"
                " WHERE b.ended_at IS NULL AND b.expires_at <= now()"
                " AND j.completed_at IS NULL AND j.status = 'pending'"
                " LIMIT $1 FOR UPDATE OF j SKIP LOCKED)"), limit)
        return _count(status)

    async def close_ended(self, limit: int) -> int:
        """Write the final counts of batches whose requests have all ended."""
        async with self._store._conn() as conn:
            rows = await conn.fetch(
                f"SELECT {_BATCH_COLUMNS} FROM batches b WHERE ended_at IS NULL AND NOT EXISTS"
                " (SELECT 1 FROM jobs j WHERE j.batch_id = b.id"
                " AND j.completed_at IS NULL) LIMIT $1", limit)
            for row in rows:
                await _view(conn, row)
        return len(rows)

    async def sweep(self, retention_s: float, batch: int) -> int:
        """Delete batches created longer ago than the retention (their results expire with
        them: a batch request's result lives as long)."""
        async with self._store._conn() as conn:
            status = await conn.execute(
                "DELETE FROM batches WHERE id IN (SELECT id FROM batches"
                " WHERE created_at < now() - make_interval(secs => $1)"
                " LIMIT $2 FOR UPDATE SKIP LOCKED)", float(retention_s), batch)
        return _count(status)


def _end_unstarted(status: str, where: str) -> str:
    """SQL ending the pending requests `where` selects as `status` (canceled or expired): a
    final row with its result's expiry, and no payload left to run."""
    return (f"WITH ended AS (UPDATE jobs SET status = '{status}', completed_at = now(),"
            " expires_at = now() + make_interval(secs => ttl_seconds),"
            f" lease_until = NULL, not_before = NULL WHERE {where} RETURNING id)"
            " DELETE FROM job_payloads WHERE job_id IN (SELECT id FROM ended)")


async def _view(conn: asyncpg.Connection, row: asyncpg.Record) -> BatchView:
    """The batch as it stands; counted from its jobs until it has ended, when the counts and
    the time the last request ended are written into its row."""
    if row["ended_at"] is not None:
        counts = {"processing": 0, "succeeded": row["succeeded"], "errored": row["errored"],
                  "canceled": row["canceled"], "expired": row["expired"]}
        return _make_view(row, counts, row["ended_at"])
    counts = dict.fromkeys(("processing", "succeeded", "errored", "canceled", "expired"), 0)
    last: datetime | None = None
    for r in await conn.fetch(
            "SELECT status, count(*) AS n, max(completed_at) AS last FROM jobs"
            " WHERE batch_id = $1 GROUP BY status", row["id"]):
        counts[_COUNT_OF[r["status"]]] += r["n"]
        if r["last"] is not None and (last is None or r["last"] > last):
            last = r["last"]
    if counts["processing"] or last is None:
        return _make_view(row, counts, None)
    ended_at = await conn.fetchval(
        "UPDATE batches SET ended_at = $2, succeeded = $3, errored = $4, canceled = $5,"
        " expired = $6 WHERE id = $1 AND ended_at IS NULL RETURNING ended_at", row["id"], last,
        counts["succeeded"], counts["errored"], counts["canceled"], counts["expired"])
    return _make_view(row, counts, ended_at or last)


def _make_view(row: asyncpg.Record, counts: dict[str, int],
               ended_at: datetime | None) -> BatchView:
    return BatchView(row["id"], row["request_count"], row["created_at"], row["expires_at"],
                     row["cancel_initiated_at"], ended_at, counts)
