"""All SQL about webhooks: the endpoints (the operator's), and the deliveries and attempts
(the workers' and the reconciler's). A change to an endpoint is announced with NOTIFY on
`ferry_webhooks`, so every api process reloads the names it accepts at once.

A delivery row is the truth about a delivery, as the job row is about a job: a worker claims
it (a lease, and an attempt row) before it sends, and records what happened after; a message
on the broker only says "look at this delivery", and may be lost, repeated or early.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import asyncpg

from shared.store import Store

CHANNEL = "ferry_webhooks"
DUE_SLACK_S = 0.05  # a delivery due this soon is sent now rather than waited for


class EndpointExists(ValueError):
    pass


class NoSuchEndpoint(LookupError):
    pass


@dataclass(frozen=True, slots=True)
class Endpoint:
    id: uuid.UUID
    name: str
    url: str
    include_response: bool
    enabled: bool
    keys: tuple[str, ...]  # names of the keys it is bound to (none: any caller)
    created_at: datetime
    previous_until: datetime | None = None  # the previous secret still signs until then


@dataclass(frozen=True, slots=True)
class EndpointReport:
    """An endpoint as `ferry webhooks list` shows it: is it being reached?"""

    endpoint: Endpoint
    last_at: datetime | None  # the last delivery's creation (= its job's end)
    last_state: str | None
    last_status: int | None
    last_error: str | None
    failed_24h: int
    pending: int


@dataclass(frozen=True, slots=True)
class Listing:
    """What the api needs to accept a name: the endpoint, and the keys that may use it."""

    id: uuid.UUID
    enabled: bool
    key_ids: frozenset[uuid.UUID]


DeliveryState = Literal["pending", "delivered", "failed"]
ClaimState = Literal["claimed", "missing", "final", "held", "early", "endpoint_off"]


@dataclass(frozen=True, slots=True)
class DeliveryClaim:
    """What claiming a delivery found. `claimed`: this worker sends attempt `attempt` now;
    `missing`: no row (its job's history was pruned); `final`: delivered or failed already;
    `held`: another worker is sending it (its lease runs `remaining_s` more); `early`: its next
    attempt is due in `remaining_s`; `endpoint_off`: the endpoint was disabled or removed."""

    state: ClaimState
    job_id: uuid.UUID | None = None
    attempt: int = 0
    url: str = ""
    secrets: tuple[str, ...] = ()
    payload: bytes = b""
    remaining_s: float = 0.0
    lease_until: datetime | None = None


_ENDPOINT = """
SELECT e.id, e.name, e.url, e.include_response, e.enabled, e.created_at, e.previous_until,
       coalesce((SELECT array_agg(k.name ORDER BY k.name) FROM webhook_endpoint_keys ek
                 JOIN api_keys k ON k.id = ek.key_id WHERE ek.endpoint_id = e.id),
                '{}') AS keys
FROM webhook_endpoints e
"""

_REPORT = f"""
SELECT x.*, last.created_at AS last_at, last.state AS last_state,
       last.last_status, last.last_error,
       (SELECT count(*) FROM webhook_deliveries d WHERE d.endpoint_id = x.id
        AND d.state = 'failed' AND d.created_at > now() - interval '24 hours') AS failed_24h,
       (SELECT count(*) FROM webhook_deliveries d WHERE d.state = 'pending'
        AND d.endpoint_id = x.id) AS pending
FROM ({_ENDPOINT} WHERE e.removed_at IS NULL) x
LEFT JOIN LATERAL (SELECT d.created_at, d.state, d.last_status, d.last_error
                   FROM webhook_deliveries d WHERE d.endpoint_id = x.id
                   ORDER BY d.created_at DESC LIMIT 1) last ON true
ORDER BY x.name
"""

# Take the delivery for one attempt if it is pending, due, nobody else is sending it, and its
# endpoint is live; the attempt row is written in the same statement. One round trip.
_CLAIM = """
WITH cur AS (
    SELECT d.id, d.job_id, d.state, d.endpoint_id, d.lease_until, d.next_attempt_at,
           d.payload, now() AS db_now
    FROM webhook_deliveries d WHERE d.id = $1 FOR UPDATE
), ep AS (
    SELECT e.url, e.secret,
           CASE WHEN e.previous_until > now() THEN e.previous_secret END AS previous_secret,
           e.enabled AND e.removed_at IS NULL AS live
    FROM webhook_endpoints e JOIN cur ON e.id = cur.endpoint_id
), taken AS (
    UPDATE webhook_deliveries d SET attempts = d.attempts + 1, next_attempt_at = NULL,
           lease_until = now() + make_interval(secs => $3)
    FROM cur, ep
    WHERE d.id = cur.id AND cur.state = 'pending' AND ep.live
      AND (cur.next_attempt_at IS NULL
           OR cur.next_attempt_at <= now() + make_interval(secs => $4))
      AND (cur.lease_until IS NULL OR cur.lease_until < now())
    RETURNING d.attempts
), logged AS (
    INSERT INTO webhook_attempts (delivery_id, attempt, worker_id)
    SELECT $1, attempts, $2 FROM taken
)
SELECT cur.*, ep.url, ep.secret, ep.previous_secret, ep.live,
       (SELECT attempts FROM taken) AS attempt
FROM cur LEFT JOIN ep ON true
"""

# What an attempt found, and what the delivery is now; only while this attempt is still the
# delivery's latest (no other worker took it over meanwhile).
_RECORD = """
WITH attempt AS (
    UPDATE webhook_attempts SET duration_ms = $3, status_code = $4, error = $5
    WHERE delivery_id = $1 AND attempt = $2 AND duration_ms IS NULL
)
UPDATE webhook_deliveries SET state = $6, lease_until = NULL, last_status = $4,
       last_error = $5,
       next_attempt_at = CASE WHEN $6 = 'pending' THEN now() + make_interval(secs => $7) END,
       finished_at = CASE WHEN $6 <> 'pending' THEN now() END,
       payload = CASE WHEN $6 = 'pending' THEN payload END
WHERE id = $1 AND attempts = $2 AND state = 'pending'
"""

_FAIL = """
UPDATE webhook_deliveries SET state = 'failed', finished_at = now(), last_error = $2,
       lease_until = NULL, next_attempt_at = NULL, payload = NULL
WHERE id = $1 AND state = 'pending'
"""


def _endpoint(row: asyncpg.Record) -> Endpoint:
    return Endpoint(row["id"], row["name"], row["url"], row["include_response"],
                    row["enabled"], tuple(row["keys"]), row["created_at"],
                    row["previous_until"])


class WebhookStore:
    def __init__(self, store: Store) -> None:
        self._store = store

    # --- endpoints (the operator's) ----------------------------------------------------------

    async def add(self, name: str, url: str, secret: str, include_response: bool,
                  key_names: list[str]) -> Endpoint:
        endpoint_id = uuid.uuid4()
        async with self._store._conn() as conn, conn.transaction():
            key_ids = await _key_ids(conn, key_names)
            try:
                await conn.execute(
                    "INSERT INTO webhook_endpoints (id, name, url, secret, include_response)"
                    " VALUES ($1, $2, $3, $4, $5)",
                    endpoint_id, name, url, secret, include_response)
            except asyncpg.UniqueViolationError:
                raise EndpointExists(f"an endpoint named {name!r} exists already") from None
            await conn.execute(
                "INSERT INTO webhook_endpoint_keys (endpoint_id, key_id)"
                " SELECT $1, unnest($2::uuid[])", endpoint_id, key_ids)
            await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, str(endpoint_id))
            row = await conn.fetchrow(f"{_ENDPOINT} WHERE e.id = $1", endpoint_id)
        return _endpoint(row)

    async def by_name(self, name: str) -> Endpoint:
        async with self._store._conn() as conn:
            row = await conn.fetchrow(f"{_ENDPOINT} WHERE e.name = $1 AND e.removed_at IS NULL",
                                      name)
        if row is None:
            raise NoSuchEndpoint(f"no webhook endpoint named {name!r}")
        return _endpoint(row)

    async def report(self) -> list[EndpointReport]:
        async with self._store._conn() as conn:
            rows = await conn.fetch(_REPORT)
        return [EndpointReport(_endpoint(r), r["last_at"], r["last_state"], r["last_status"],
                               r["last_error"], r["failed_24h"], r["pending"]) for r in rows]

    async def set_enabled(self, name: str, enabled: bool) -> Endpoint:
        await self._change(name, "enabled = $2", enabled)
        return await self.by_name(name)

    async def rotate(self, name: str, secret: str, grace_s: float) -> Endpoint:
        """A new secret; the current one keeps signing (a second signature) for `grace_s`."""
        await self._change(
            name, "previous_secret = secret, secret = $2,"
            " previous_until = now() + make_interval(secs => $3)", secret, float(grace_s))
        return await self.by_name(name)

    async def remove(self, name: str) -> tuple[Endpoint, int]:
        """Disable and hide the endpoint (its history stays); its pending deliveries fail.
        Returns the endpoint and how many deliveries that failed."""
        endpoint = await self.by_name(name)
        async with self._store._conn() as conn, conn.transaction():
            await conn.execute(
                "UPDATE webhook_endpoints SET enabled = false, removed_at = now(),"
                " updated_at = now() WHERE id = $1", endpoint.id)
            status = await conn.execute(
                "UPDATE webhook_deliveries SET state = 'failed', finished_at = now(),"
                " last_error = 'the endpoint was removed', lease_until = NULL,"
                " next_attempt_at = NULL, payload = NULL"
                " WHERE endpoint_id = $1 AND state = 'pending'", endpoint.id)
            await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, str(endpoint.id))
        return endpoint, int(status.split()[-1])

    async def _change(self, name: str, assignments: str, *values: object) -> None:
        async with self._store._conn() as conn:
            endpoint_id = await conn.fetchval(
                f"UPDATE webhook_endpoints SET {assignments}, updated_at = now()"
                " WHERE name = $1 AND removed_at IS NULL RETURNING id", name, *values)
            if endpoint_id is None:
                raise NoSuchEndpoint(f"no webhook endpoint named {name!r}")
            await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, str(endpoint_id))

    # --- the api's directory of names --------------------------------------------------------

    async def listings(self) -> dict[str, Listing]:
        async with self._store._conn() as conn:
            rows = await conn.fetch(
                "SELECT e.id, e.name, e.enabled, array_remove(array_agg(ek.key_id), NULL)"
                " AS key_ids FROM webhook_endpoints e"
                " LEFT JOIN webhook_endpoint_keys ek ON ek.endpoint_id = e.id"
                " WHERE e.removed_at IS NULL GROUP BY e.id")
        return {r["name"]: Listing(r["id"], r["enabled"], frozenset(r["key_ids"]))
                for r in rows}

    # --- deliveries (the workers') -----------------------------------------------------------

    async def claim(self, delivery_id: uuid.UUID, worker_id: str,
                    lease_s: float) -> DeliveryClaim:
        async with self._store._conn() as conn:
            row = await conn.fetchrow(_CLAIM, delivery_id, worker_id, float(lease_s),
                                      DUE_SLACK_S)
        if row is None:
            return DeliveryClaim("missing")
        job_id = row["job_id"]
        if row["attempt"] is not None:
            signing = tuple(s for s in (row["secret"], row["previous_secret"]) if s)
            return DeliveryClaim("claimed", job_id, row["attempt"], row["url"], signing,
                                 bytes(row["payload"]))
        if row["state"] != "pending":
            return DeliveryClaim("final", job_id)
        if not row["live"]:
            return DeliveryClaim("endpoint_off", job_id)
        now = row["db_now"]
        if row["lease_until"] is not None and row["lease_until"] >= now:
            return DeliveryClaim("held", job_id, remaining_s=(row["lease_until"] - now)
                                 .total_seconds(), lease_until=row["lease_until"])
        remaining = (row["next_attempt_at"] - now).total_seconds()
        return DeliveryClaim("early", job_id, remaining_s=remaining)

    async def record(self, delivery_id: uuid.UUID, attempt: int, *, duration_ms: int,
                     status_code: int | None, error: str | None,
                     state: DeliveryState,
                     retry_in_s: float = 0.0) -> bool:
        """What attempt `attempt` found, and the delivery's state now (`pending`: the next
        attempt is due in `retry_in_s`). False if another worker took the delivery over."""
        async with self._store._conn() as conn:
            status = await conn.execute(_RECORD, delivery_id, attempt, duration_ms,
                                        status_code, error, state, float(retry_in_s))
        return status.endswith(" 1")

    async def release(self, delivery_id: uuid.UUID, attempt: int) -> None:
        """The worker is stopping mid-attempt: the next one need not wait for the lease."""
        async with self._store._conn() as conn:
            await conn.execute(
                "WITH a AS (UPDATE webhook_attempts SET error = 'interrupted: the worker"
                " stopped' WHERE delivery_id = $1 AND attempt = $2 AND duration_ms IS NULL)"
                " UPDATE webhook_deliveries SET lease_until = NULL"
                " WHERE id = $1 AND attempts = $2 AND state = 'pending'", delivery_id, attempt)

    async def fail(self, delivery_id: uuid.UUID, reason: str) -> bool:
        """Fail a delivery that is still pending (its endpoint went, the broker gave up)."""
        async with self._store._conn() as conn:
            status = await conn.execute(_FAIL, delivery_id, reason)
        return status.endswith(" 1")

    async def mark_published(self, ids: list[uuid.UUID]) -> None:
        async with self._store._conn() as conn:
            await conn.execute("UPDATE webhook_deliveries SET published_at = now()"
                               " WHERE id = ANY($1::uuid[])", ids)

    # --- the reconciler's scans ----------------------------------------------------------------

    async def unpublished(self, older_than_s: float, limit: int) -> list[uuid.UUID]:
        """Pending deliveries never confirmed by the broker (the worker stopped between the
        job's commit and the publish, or the publish failed)."""
        async with self._store._conn() as conn:
            rows = await conn.fetch(
                "SELECT id FROM webhook_deliveries WHERE state = 'pending'"
                " AND published_at IS NULL AND next_attempt_at IS NULL"
                " AND created_at < now() - make_interval(secs => $1)"
                " ORDER BY created_at LIMIT $2", float(older_than_s), limit)
        return [r["id"] for r in rows]

    async def release_overdue(self, grace_s: float, limit: int) -> list[uuid.UUID]:
        """Deliveries whose retry is long overdue (their delayed message never came back)."""
        return await self._release(
            "UPDATE webhook_deliveries SET next_attempt_at = NULL, published_at = NULL"
            " WHERE id IN (SELECT id FROM webhook_deliveries WHERE state = 'pending'"
            " AND next_attempt_at < now() - make_interval(secs => $1)"
            " AND (lease_until IS NULL OR lease_until < now())"
            " LIMIT $2 FOR UPDATE SKIP LOCKED) RETURNING id", grace_s, limit)

    async def release_stale(self, older_than_s: float, limit: int) -> list[uuid.UUID]:
        """Due deliveries published long ago that nobody is sending (their message was lost;
        the caller checks that the webhooks queue has nothing waiting)."""
        return await self._release(
            "UPDATE webhook_deliveries SET published_at = NULL WHERE id IN ("
            " SELECT id FROM webhook_deliveries WHERE state = 'pending'"
            " AND next_attempt_at IS NULL"
            " AND published_at < now() - make_interval(secs => $1)"
            " AND (lease_until IS NULL OR lease_until < now())"
            " LIMIT $2 FOR UPDATE SKIP LOCKED) RETURNING id", older_than_s, limit)

    async def _release(self, sql: str, seconds: float, limit: int) -> list[uuid.UUID]:
        async with self._store._conn() as conn:
            return [r["id"] for r in await conn.fetch(sql, float(seconds), limit)]


async def _key_ids(conn: asyncpg.Connection, names: list[str]) -> list[uuid.UUID]:
    rows = await conn.fetch("SELECT name, id FROM api_keys WHERE name = ANY($1::text[])", names)
    found = {r["name"]: r["id"] for r in rows}
    missing = [n for n in names if n not in found]
    if missing:
        raise ValueError(f"no key named {missing[0]!r} (see `ferry keys list`)")
    return [found[n] for n in dict.fromkeys(names)]
