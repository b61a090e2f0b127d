"""The bench's own database: created fresh each run, read directly for job figures."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import asyncpg

# What a stored result looks like (a short message), so the sweeper deletes realistic rows.
RESULT_BODY = (
    '{"id":"msg_bench","type":"message","role":"assistant","model":"claude-bench",'
    '"content":[{"type":"text","text":"echo: a short answer of about the usual size"}],'
    '"stop_reason":"end_turn","stop_sequence":null,'
    '"usage":{"input_tokens":12,"output_tokens":9,"cache_creation_input_tokens":0,'
    '"cache_read_input_tokens":0}}'
)


def with_database(dsn: str, name: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + name))


async def drop_database(admin_dsn: str, name: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@dataclass(frozen=True)
class JobSpan:
    count: int
    first_submitted: float | None  # epoch seconds
    first_started: float | None
    last_completed: float | None


@dataclass(frozen=True)
class BatchSpan:
    count: int
    seconds: float


class BenchDB:
    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    @classmethod
    async def connect(cls, dsn: str) -> BenchDB:
        return cls(await asyncpg.connect(dsn))

    async def close(self) -> None:
        await self._conn.close()

    async def reset(self) -> None:
        await self._conn.execute("TRUNCATE jobs, batches CASCADE")

    async def forget_pacing(self) -> None:
        """What workers learned of provider rate limits (migration 0007): a cold start."""
        await self._conn.execute("DELETE FROM provider_pace")

    async def last_finished(self) -> float:
        """The latest completed_at of any job, failed ones included (Unix time)."""
        value = await self._conn.fetchval(
            "SELECT extract(epoch FROM max(completed_at))::float8 FROM jobs")
        return float(value or 0.0)

    async def wal_bytes(self) -> int:
        """WAL written by the whole cluster since its statistics were reset."""
        return int(await self._conn.fetchval("SELECT wal_bytes FROM pg_stat_wal"))

    async def bytes_per_job(self) -> float:
        """What the job tables take on disk (indexes and TOAST included), per job row."""
        row = await self._conn.fetchrow(
            "SELECT pg_total_relation_size('jobs') + pg_total_relation_size('job_results')"
            " + pg_total_relation_size('job_payloads') AS size,"
            " (SELECT count(*) FROM jobs) AS n")
        return float(row["size"]) / max(int(row["n"]), 1)

    async def job_ids(self) -> list[uuid.UUID]:
        return [r["id"] for r in await self._conn.fetch("SELECT id FROM jobs")]

    async def completion_times(self) -> dict[uuid.UUID, float]:
        """Each finished job's completed_at, as a Unix time."""
        rows = await self._conn.fetch(
            "SELECT id, extract(epoch FROM completed_at)::float8 AS t FROM jobs"
            " WHERE completed_at IS NOT NULL")
        return {r["id"]: r["t"] for r in rows}

    async def status_counts(self) -> dict[str, int]:
        rows = await self._conn.fetch("SELECT status, count(*) AS n FROM jobs GROUP BY status")
        return {r["status"]: r["n"] for r in rows}

    async def wait_finished(self, expected: int, timeout_s: float, poll_s: float = 0.2
                            ) -> dict[str, int]:
        """Poll until `expected` async jobs are completed or failed (or `timeout_s`)."""
        deadline = time.monotonic() + timeout_s
        while True:
            counts = await self.status_counts()
            if counts.get("completed", 0) + counts.get("failed", 0) >= expected:
                return counts
            if time.monotonic() > deadline:
                return counts
            await asyncio.sleep(poll_s)

    async def async_job_span(self) -> JobSpan:
        row = await self._conn.fetchrow(
            "SELECT count(*) AS n, extract(epoch FROM min(submitted_at)) AS sub,"
            " extract(epoch FROM min(started_at)) AS start,"
            " extract(epoch FROM max(completed_at)) AS done"
            " FROM jobs WHERE mode = 'async' AND status = 'completed'"
        )
        return JobSpan(row["n"], _f(row["sub"]), _f(row["start"]), _f(row["done"]))

    async def async_latencies(self) -> list[float]:
        """completed_at − submitted_at of every finished async job, in seconds, sorted."""
        rows = await self._conn.fetch(
            "SELECT extract(epoch FROM completed_at - submitted_at)::float8 AS s FROM jobs"
            " WHERE mode = 'async' AND completed_at IS NOT NULL ORDER BY 1")
        return [r["s"] for r in rows]

    async def batch_span(self) -> BatchSpan:
        """Succeeded batch requests, and the seconds from the first started to the last done."""
        row = await self._conn.fetchrow(
            "SELECT count(*) AS n, extract(epoch FROM max(completed_at) - min(started_at))"
            "::float8 AS s FROM jobs WHERE mode = 'batch' AND status = 'completed'")
        return BatchSpan(row["n"], float(row["s"] or 0))

    async def pickup_and_run(self) -> tuple[float, float, float]:
        """(seconds from first to last started_at, p50 and p99 of completed_at − started_at)
        over completed async jobs: whether jobs waited to be picked up or to be finished."""
        row = await self._conn.fetchrow(
            "SELECT extract(epoch FROM max(started_at) - min(started_at)) AS spread,"
            " percentile_cont(0.5) WITHIN GROUP (ORDER BY"
            "  extract(epoch FROM completed_at - started_at)) AS p50,"
            " percentile_cont(0.99) WITHIN GROUP (ORDER BY"
            "  extract(epoch FROM completed_at - started_at)) AS p99"
            " FROM jobs WHERE mode = 'async' AND status = 'completed'"
        )
        return float(row["spread"] or 0), float(row["p50"] or 0), float(row["p99"] or 0)

    async def peak_in_flight(self) -> int:
        """Most async jobs between started_at and completed_at at one instant."""
        return int(await self._conn.fetchval(
            "SELECT coalesce(max(running), 0) FROM ("
            " SELECT sum(delta) OVER (ORDER BY at, delta) AS running FROM ("
            "  SELECT started_at AS at, 1 AS delta FROM jobs"
            "   WHERE mode = 'async' AND started_at IS NOT NULL"
            "  UNION ALL SELECT completed_at, -1 FROM jobs"
            "   WHERE mode = 'async' AND completed_at IS NOT NULL) e) s"
        ))

    async def seed_expired(self, rows: int) -> None:
        """`rows` finished async jobs whose results expired an hour ago, as the sweeper finds
        them after a quiet spell; then ANALYZE, as autovacuum would soon do."""
        await self._conn.execute(
            "INSERT INTO jobs (id, caller_hash, mode, model, provider, status, ttl_seconds,"
            " attempts, deliveries, input_tokens, output_tokens, stop_reason, submitted_at,"
            " started_at, completed_at, expires_at)"
            " SELECT gen_random_uuid(), '\\x00'::bytea, 'async', 'claude-bench', 'anthropic',"
            " 'completed', 60, 1, 1, 12, 9, 'end_turn', t - interval '2 minutes',"
            " t - interval '2 minutes', t - interval '1 minute', t"
            " FROM (SELECT now() - interval '1 hour' - g * interval '1 millisecond' AS t"
            "       FROM generate_series(1, $1) g) s",
            rows,
        )
        await self._conn.execute(
            "INSERT INTO job_results (job_id, body, expires_at)"
            " SELECT id, $1::json, expires_at FROM jobs WHERE expires_at < now()",
            RESULT_BODY,
        )
        await self._conn.execute("ANALYZE jobs")
        await self._conn.execute("ANALYZE job_results")

    async def sweep_state(self, lock_key: int) -> tuple[bool, bool]:
        """(is the sweeper's advisory lock held, are there results left). The newest result
        goes last (the sweeper deletes oldest first), so a backward index scan finds it
        cheaply until the very end."""
        row = await self._conn.fetchrow(
            "SELECT EXISTS (SELECT FROM pg_locks WHERE locktype = 'advisory'"
            "  AND classid::bigint = $1 AND objid::bigint = $2 AND objsubid = 1) AS locked,"
            " EXISTS (SELECT FROM (SELECT 1 FROM job_results ORDER BY expires_at DESC LIMIT 1)"
            "  s) AS left",
            lock_key >> 32, lock_key & 0xFFFFFFFF,
        )
        return bool(row["locked"]), bool(row["left"])


def _f(value: object) -> float | None:
    return None if value is None else float(value)  # type: ignore[arg-type]
