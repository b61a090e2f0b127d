"""Who is calling: the gateway key a request presents (FERRY_AUTH=keys, the default), or, with
FERRY_AUTH=off, just the hash of whatever credential it presents.

Keys are looked up by the SHA-256 of the secret and cached in the process. A change to a key
(revoked, limits changed) is announced by PostgreSQL NOTIFY and drops the cached copy at once,
in every api process; cached keys keep working while PostgreSQL is briefly away.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from shared.errors import AuthenticationFailed, FerryError, Unavailable
from shared.jobs import caller_hash, credential_of
from shared.keys import KeyRecord, hash_secret
from shared.keystore import CHANNEL, KeyStore
from shared.logging import get_logger
from shared.notify import Listener

log = get_logger("ferry.auth")

MAX_AGE_S = 60.0  # a cached key is re-read after this even without a notification
UNKNOWN_TTL_S = 5.0  # an unknown secret is not looked up again for this long
MAX_UNKNOWN = 10_000
LISTEN_RETRY_S = 2.0


class PermissionDenied(FerryError):
    status = 403
    error_type = "permission_error"


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller: what its jobs are bound to, and its key (None with FERRY_AUTH=off)."""

    owner: bytes
    key: KeyRecord | None = None
    anonymous: bool = False

    @property
    def key_id(self) -> uuid.UUID | None:
        return self.key.id if self.key is not None else None


def presented_secret(headers: Mapping[str, str]) -> str:
    """x-api-key, then Bifrost's x-bf-vk, then Authorization: Bearer."""
    return credential_of(headers.get("x-api-key") or headers.get("x-bf-vk"),
                         headers.get("authorization"))


class Gate:
    def __init__(self, keystore: KeyStore | None, dsn: str) -> None:
        """`keystore` None: FERRY_AUTH=off."""
        self._keys = keystore
        self._dsn = dsn
        self._cache: dict[bytes, tuple[KeyRecord, float]] = {}
        self._unknown: dict[bytes, float] = {}
        self._listener = Listener(dsn, CHANNEL, self._changed, self._reconnected,
                                  retry_s=LISTEN_RETRY_S)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Gate]:
        if self._keys is None:
            log.warning("FERRY_AUTH=off: any caller can use this gateway and spend its "
                        "provider keys; jobs are bound to the hash of the presented credential")
            yield self
            return
        async with self._listener.running():
            yield self

    def _reconnected(self) -> None:
        """Changes may have been missed while away: drop the cache. (A lost connection keeps
        it: keys work while the database is away.)"""
        self._cache.clear()
        self._unknown.clear()

    def _changed(self, key_id: str) -> None:
        for secret_hash, (record, _) in list(self._cache.items()):
            if str(record.id) == key_id:
                del self._cache[secret_hash]
        self._unknown.clear()  # a new key may be one somebody just tried

    async def wait_listening(self, timeout_s: float) -> bool:
        return await self._listener.wait_listening(timeout_s)

    async def authenticate(self, headers: Mapping[str, str]) -> Principal:
        secret = presented_secret(headers)
        if self._keys is None:
            return Principal(caller_hash(secret, None), anonymous=not secret)
        if not secret:
            raise AuthenticationFailed("missing API key: send it as x-api-key, "
                                       "Authorization: Bearer, or x-bf-vk")
        record = await self._lookup(hash_secret(secret))
        if record is None:
            raise AuthenticationFailed("invalid API key")
        problem = record.problem(datetime.now(UTC))
        if problem is not None:
            raise AuthenticationFailed(problem)
        return Principal(record.owner, record)

    async def _lookup(self, secret_hash: bytes) -> KeyRecord | None:
        assert self._keys is not None
        now = time.monotonic()
        cached = self._cache.get(secret_hash)
        if cached is not None and now - cached[1] < MAX_AGE_S:
            return cached[0]
        if self._unknown.get(secret_hash, 0.0) > now:
            return None
        try:
            record = await self._keys.by_hash(secret_hash)
        except Unavailable:
            if cached is not None:
                return cached[0]  # the database is away: the cached key still works
            raise Unavailable("cannot verify the API key right now; retry") from None
        if record is None:
            if len(self._unknown) >= MAX_UNKNOWN:
                self._unknown.clear()
            self._unknown[secret_hash] = now + UNKNOWN_TTL_S
            return None
        self._cache[secret_hash] = (record, now)
        return record


def check_model(principal: Principal, model: str) -> None:
    key = principal.key
    if key is not None and not key.allows(model):
        raise PermissionDenied(f"the API key {key.name!r} may not use model {model[:200]!r}")
