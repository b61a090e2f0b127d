"""All SQL about gateway keys: the keys themselves, their per-minute usage, and the leases of
requests in flight. A change to a key is announced with NOTIFY on `ferry_keys`, so every api
process drops its cached copy at once (revocation takes effect everywhere within moments)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from shared.keys import KeyRecord, Limits
from shared.store import Store

CHANNEL = "ferry_keys"
_COLUMNS = ("id, name, prefix, created_at, expires_at, revoked_at, rpm, tpm, concurrency,"
            " max_pending, models")


class KeyExists(ValueError):
    pass


class NoSuchKey(LookupError):
    pass


def _record(row: asyncpg.Record) -> KeyRecord:
    return KeyRecord(
        id=row["id"], name=row["name"], prefix=row["prefix"], created_at=row["created_at"],
        expires_at=row["expires_at"], revoked_at=row["revoked_at"],
        limits=Limits(row["rpm"], row["tpm"], row["concurrency"], row["max_pending"]),
        models=tuple(row["models"] or ()),
    )


@dataclass(frozen=True, slots=True)
class Window:
    """A key's minute: what this api was granted of its requests, and its tokens so far."""

    granted: int
    requests: int  # admitted in the window by every api, after this grant
    tokens: int


class KeyStore:
    def __init__(self, store: Store) -> None:
        self._store = store

    # --- the keys ----------------------------------------------------------------------------

    async def create(self, name: str, secret_hash: bytes, prefix: str, limits: Limits,
                     models: tuple[str, ...], expires_at: datetime | None) -> KeyRecord:
        async with self._store._conn() as conn:
            try:
                row = await conn.fetchrow(
                    f"INSERT INTO api_keys (id, name, prefix, secret_hash, rpm, tpm,"
                    f" concurrency, max_pending, models, expires_at)"
                    f" VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING {_COLUMNS}",
                    uuid.uuid4(), name, prefix, secret_hash, limits.rpm, limits.tpm,
                    limits.concurrency, limits.max_pending, list(models) or None, expires_at)
            except asyncpg.UniqueViolationError as exc:
                what = "name" if "name" in str(exc) else "secret"
                raise KeyExists(f"a key with this {what} exists already") from None
            await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, str(row["id"]))
        return _record(row)

    async def all(self) -> list[KeyRecord]:
        async with self._store._conn() as conn:
            rows = await conn.fetch(f"SELECT {_COLUMNS} FROM api_keys ORDER BY created_at")
        return [_record(r) for r in rows]

    async def count(self) -> int:
        async with self._store._conn() as conn:
            return int(await conn.fetchval("SELECT count(*) FROM api_keys"))

    async def by_hash(self, secret_hash: bytes) -> KeyRecord | None:
        async with self._store._conn() as conn:
            row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM api_keys WHERE secret_hash = $1",
                                      secret_hash)
        return None if row is None else _record(row)

    async def by_name(self, name: str) -> KeyRecord:
        async with self._store._conn() as conn:
            row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM api_keys WHERE name = $1", name)
        if row is None:
            raise NoSuchKey(f"no key named {name!r}")
        return _record(row)

    async def update(self, name: str, changes: dict[str, Any]) -> KeyRecord:
        """Set columns of a key (limits, models, expires_at; None clears a limit)."""
        allowed = {"rpm", "tpm", "concurrency", "max_pending", "models", "expires_at"}
        unknown = set(changes) - allowed
        if unknown:
            raise ValueError(f"cannot change {', '.join(sorted(unknown))}")
        if not changes:
            return await self.by_name(name)
        columns = sorted(changes)
        assignments = ", ".join(f"{c} = ${i + 2}" for i, c in enumerate(columns))
        values = [list(changes[c]) or None if c == "models" and changes[c] is not None
                  else changes[c] for c in columns]
        async with self._store._conn() as conn:
            row = await conn.fetchrow(
                f"UPDATE api_keys SET {assignments}, updated_at = now() WHERE name = $1"
                f" RETURNING {_COLUMNS}", name, *values)
            if row is None:
                raise NoSuchKey(f"no key named {name!r}")
            await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, str(row["id"]))
        return _record(row)

    async def revoke(self, name: str) -> KeyRecord:
        async with self._store._conn() as conn:
            row = await conn.fetchrow(
                f"UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()),"
                f" updated_at = now() WHERE name = $1 RETURNING {_COLUMNS}", name)
            if row is None:
                raise NoSuchKey(f"no key named {name!r}")
            await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, str(row["id"]))
        return _record(row)

    # --- usage per minute --------------------------------------------------------------------

    async def take_requests(self, key_id: uuid.UUID, window: datetime, want: int,
                            rpm: int | None) -> Window:
        """Grant up to `want` requests of the key's minute (all of them without an rpm)."""
        async with self._store._conn() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO key_usage (key_id, window_start) VALUES ($1, $2)"
                " ON CONFLICT (key_id, window_start) DO NOTHING", key_id, window)
            row = await conn.fetchrow(
                "WITH cur AS (SELECT requests AS old FROM key_usage"
                "             WHERE key_id = $1 AND window_start = $2 FOR UPDATE),"
                "     g AS (SELECT greatest(0, least($3, coalesce($4 - old, $3))) AS granted"
                "           FROM cur)"
                " UPDATE key_usage u SET requests = u.requests + g.granted FROM g"
                " WHERE u.key_id = $1 AND u.window_start = $2"
                " RETURNING g.granted, u.requests, u.tokens", key_id, window, want, rpm)
        return Window(row["granted"], row["requests"], row["tokens"])

    async def window_tokens(self, key_id: uuid.UUID, window: datetime) -> int:
        async with self._store._conn() as conn:
            value = await conn.fetchval(
                "SELECT tokens FROM key_usage WHERE key_id = $1 AND window_start = $2",
                key_id, window)
        return int(value or 0)

    async def add_tokens(self, usage: list[tuple[uuid.UUID, datetime, int]]) -> None:
        """Tokens providers reported, per key and minute (workers batch them)."""
        if not usage:
            return
        async with self._store._conn() as conn:
            await conn.execute(
                "INSERT INTO key_usage AS u (key_id, window_start, tokens)"
                " SELECT * FROM unnest($1::uuid[], $2::timestamptz[], $3::bigint[])"
                " ON CONFLICT (key_id, window_start) DO UPDATE SET tokens = u.tokens"
                " + excluded.tokens",
                [u[0] for u in usage], [u[1] for u in usage], [u[2] for u in usage])

    async def prune_usage(self, older_than_s: float) -> int:
        async with self._store._conn() as conn:
            status = await conn.execute(
                "DELETE FROM key_usage WHERE window_start < now() - make_interval(secs => $1)",
                float(older_than_s))
            await conn.execute("DELETE FROM key_leases WHERE expires_at < now()")
        return int(status.split()[-1])

    # --- requests in flight ------------------------------------------------------------------

    async def acquire_lease(self, key_id: uuid.UUID, limit: int,
                            ttl_s: float) -> uuid.UUID | None:
        """A slot among the key's `limit` requests in flight, or None when all are taken. The
        key's row is locked meanwhile, so api replicas never both take the last slot."""
        lease = uuid.uuid4()
        async with self._store._conn() as conn, conn.transaction():
            await conn.execute("SELECT 1 FROM api_keys WHERE id = $1 FOR UPDATE", key_id)
            taken = await conn.fetchval(
                "SELECT count(*) FROM key_leases WHERE key_id = $1 AND expires_at > now()",
                key_id)
            if taken >= limit:
                return None
            await conn.execute(
                "INSERT INTO key_leases (id, key_id, expires_at)"
                " VALUES ($1, $2, now() + make_interval(secs => $3))", lease, key_id,
                float(ttl_s))
        return lease

    async def release_lease(self, lease: uuid.UUID) -> None:
        async with self._store._conn() as conn:
            await conn.execute("DELETE FROM key_leases WHERE id = $1", lease)
