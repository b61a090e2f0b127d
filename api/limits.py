"""Per-key limits that hold across any number of api processes, kept in PostgreSQL (already
there, and the one place every replica sees):

- requests per minute: each api takes a key's minute in chunks of about 5 % of its limit
  (`key_usage.requests`, granted under a row lock), so PostgreSQL sees a few writes a minute
  per key and replica, and the replicas together stay within a chunk each of the limit;
- tokens per minute: workers add the tokens providers report to the same row; a key whose
  minute is spent is refused until the next one (a request's own tokens are only known after
  it ran, so the last request of a minute may go over);
- sync/stream requests in flight: a lease row per request, taken under the key's row lock;
- async jobs not finished: counted when the submit is stored (`Store.insert_jobs`).

Windows are fixed minutes. Past a limit: 429 `rate_limit_error` with `retry-after` and the
`anthropic-ratelimit-*` headers describing the key's own budget, which the SDKs read. While
PostgreSQL is away, requests and tokens are not limited (the gateway stays up); concurrency
and pending limits need it and answer 503.
"""

from __future__ import annotations

import contextlib
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from api.auth import Principal
from shared.errors import RateLimited, Unavailable
from shared.keys import KeyRecord
from shared.keystore import KeyStore
from shared.logging import get_logger

log = get_logger("ferry.limits")

CHUNK_SHARE = 0.05
TOKENS_REFRESH_S = 1.0


def minute(now: datetime) -> datetime:
    return now.replace(second=0, microsecond=0)


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


@dataclass
class _Allowance:
    window: datetime
    left: int = 0  # requests granted to this process and not used yet
    requests: int = 0  # the key's requests in the window, every api, as last seen
    tokens: int = 0
    tokens_at: float = 0.0


class Limiter:
    def __init__(self, keystore: KeyStore, lease_ttl_s: float) -> None:
        self._keys = keystore
        self._lease_ttl_s = lease_ttl_s
        self._allowances: dict[uuid.UUID, _Allowance] = {}

    async def admit(self, principal: Principal) -> None:
        """Count one request against the key's minute; raises RateLimited past rpm or tpm."""
        key = principal.key
        if key is None or (key.limits.rpm is None and key.limits.tpm is None):
            return
        now = datetime.now(UTC)
        window = minute(now)
        allowance = self._allowances.get(key.id)
        if allowance is None or allowance.window != window:
            allowance = self._allowances[key.id] = _Allowance(window)
        try:
            await self._check_tokens(key, allowance)
            if key.limits.rpm is not None and allowance.left == 0:
                chunk = max(1, math.ceil(key.limits.rpm * CHUNK_SHARE))
                taken = await self._keys.take_requests(key.id, window, chunk, key.limits.rpm)
                allowance.left += taken.granted
                allowance.requests, allowance.tokens = taken.requests, taken.tokens
                allowance.tokens_at = time.monotonic()
                if taken.granted == 0:
                    raise self._limited(key, allowance, now, "requests")
        except Unavailable:
            log.warning("rate limits unchecked: the database is unavailable", key=key.name)
            return
        if key.limits.rpm is not None:
            allowance.left -= 1

    async def _check_tokens(self, key: KeyRecord, allowance: _Allowance) -> None:
        tpm = key.limits.tpm
        if tpm is None:
            return
        if time.monotonic() - allowance.tokens_at > TOKENS_REFRESH_S:
            allowance.tokens = await self._keys.window_tokens(key.id, allowance.window)
            allowance.tokens_at = time.monotonic()
        if allowance.tokens >= tpm:
            raise self._limited(key, allowance, datetime.now(UTC), "tokens")

    def _limited(self, key: KeyRecord, allowance: _Allowance, now: datetime,
                 what: str) -> RateLimited:
        reset = allowance.window + timedelta(minutes=1)
        wait = max(1, math.ceil((reset - now).total_seconds()))
        headers = {"retry-after": str(wait), **self.headers(key, allowance, reset)}
        limit = key.limits.rpm if what == "requests" else key.limits.tpm
        return RateLimited(f"the API key {key.name!r} is over its limit of {limit} {what} per "
                           f"minute; retry after {wait} s", headers=headers)

    @staticmethod
    def headers(key: KeyRecord, allowance: _Allowance, reset: datetime) -> dict[str, str]:
        out = {}
        if key.limits.rpm is not None:
            out.update({
                "anthropic-ratelimit-requests-limit": str(key.limits.rpm),
                "anthropic-ratelimit-requests-remaining":
                    str(max(0, key.limits.rpm - allowance.requests + allowance.left)),
                "anthropic-ratelimit-requests-reset": _rfc3339(reset)})
        if key.limits.tpm is not None:
            out.update({
                "anthropic-ratelimit-tokens-limit": str(key.limits.tpm),
                "anthropic-ratelimit-tokens-remaining":
                    str(max(0, key.limits.tpm - allowance.tokens)),
                "anthropic-ratelimit-tokens-reset": _rfc3339(reset)})
        return out

    @contextlib.asynccontextmanager
    async def in_flight(self, principal: Principal) -> AsyncIterator[None]:
        """Hold one of the key's concurrent sync/stream slots for the block."""
        key = principal.key
        if key is None or key.limits.concurrency is None:
            yield
            return
        lease = await self._keys.acquire_lease(key.id, key.limits.concurrency,
                                               self._lease_ttl_s)
        if lease is None:
            raise RateLimited(
                f"the API key {key.name!r} has {key.limits.concurrency} requests in flight, "
                "its limit; retry when one has finished", headers={"retry-after": "1"})
        try:
            yield
        finally:
            with contextlib.suppress(Unavailable):
                await self._keys.release_lease(lease)
