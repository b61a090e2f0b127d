"""All SQL about pacing provider keys (migration 0007): reserving request slots and recording
a provider's "wait" (a 429's retry-after) so that every worker honours it."""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass

from shared.store import Store


def key_fingerprint(key: str | None) -> str:
    """What the database knows a provider key by: a prefix of its SHA-256, never the key."""
    return hashlib.sha256((key or "").encode()).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class Reservation:
    first_s: float  # seconds from now to the first slot reserved (or, if none, to the next free)
    granted: int  # consecutive slots, `interval_s` apart, from `first_s` on


class PaceStore:
    def __init__(self, store: Store) -> None:
        self._store = store

    async def reserve(self, provider: str, key_fp: str, interval_s: float, wanted: int,
                      horizon_s: float) -> Reservation:
        async with self._store._conn() as conn:
            row = await conn.fetchrow("SELECT * FROM ferry_pace_reserve($1, $2, $3, $4, $5)",
                                      provider, key_fp, interval_s, wanted, horizon_s)
        assert row is not None
        return Reservation(max(float(row["first_s"]), 0.0), int(row["granted"]))

    async def block(self, provider: str, key_fp: str, interval_s: float, wait_s: float) -> None:
        """No call on this key before `wait_s` from now (the provider said so)."""
        async with self._store._conn() as conn:
            await conn.execute(
                "INSERT INTO provider_pace AS p (provider, key_fp, interval_s, blocked_until)"
                " VALUES ($1, $2, $3, clock_timestamp() + make_interval(secs => $4))"
                " ON CONFLICT (provider, key_fp) DO UPDATE SET blocked_until ="
                " greatest(p.blocked_until, EXCLUDED.blocked_until),"
                " updated_at = clock_timestamp()",
                provider, key_fp, interval_s, wait_s)

    async def debit_tokens(self, provider: str, key_fp: str, interval_s: float,
                           seconds: float) -> None:
        """Tokens an answer used, as the seconds of the key's token rate they took up."""
        async with self._store._conn() as conn:
            await conn.execute(
                "INSERT INTO provider_pace AS p (provider, key_fp, interval_s, tok_tat)"
                " VALUES ($1, $2, $3, clock_timestamp() + make_interval(secs => $4))"
                " ON CONFLICT (provider, key_fp) DO UPDATE SET tok_tat ="
                " greatest(p.tok_tat, clock_timestamp()) + make_interval(secs => $4),"
                " updated_at = clock_timestamp()",
                provider, key_fp, interval_s, seconds)

    async def acquire_lease(self, provider: str, key_fp: str, limit: int,
                            ttl_s: float) -> uuid.UUID | None:
        """A place among the key's `limit` calls in flight, or None when all are taken."""
        lease = uuid.uuid4()
        async with self._store._conn() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO provider_pace (provider, key_fp, interval_s) VALUES ($1, $2, 1)"
                " ON CONFLICT (provider, key_fp) DO NOTHING", provider, key_fp)
            await conn.execute("SELECT 1 FROM provider_pace WHERE provider = $1"
                               " AND key_fp = $2 FOR UPDATE", provider, key_fp)
            taken = await conn.fetchval(
                "SELECT count(*) FROM provider_leases WHERE provider = $1 AND key_fp = $2"
                " AND expires_at > now()", provider, key_fp)
            if taken >= limit:
                await conn.execute(
                    "DELETE FROM provider_leases WHERE provider = $1 AND key_fp = $2"
                    " AND expires_at <= now()", provider, key_fp)
                return None
            await conn.execute(
                "INSERT INTO provider_leases (id, provider, key_fp, expires_at)"
                " VALUES ($1, $2, $3, now() + make_interval(secs => $4))",
                lease, provider, key_fp, float(ttl_s))
        return lease

    async def release_lease(self, lease: uuid.UUID) -> None:
        async with self._store._conn() as conn:
            await conn.execute("DELETE FROM provider_leases WHERE id = $1", lease)

    async def learned(self, provider: str, key_fp: str) -> float | None:
        """The interval another worker paced this key at, if any did recently."""
        async with self._store._conn() as conn:
            return await conn.fetchval(  # type: ignore[no-any-return]
                "SELECT interval_s FROM provider_pace WHERE provider = $1 AND key_fp = $2"
                " AND updated_at > now() - interval '10 minutes'", provider, key_fp)
