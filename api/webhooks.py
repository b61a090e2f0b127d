"""Which webhook endpoint a submit names (`x-bf-async-webhook: NAME`): resolved from a copy
of the endpoints held in the process, so a submit costs no query. A change to an endpoint
(added, disabled, removed, rotated) is announced by PostgreSQL NOTIFY and makes the next
lookup reload the copy, in every api process; a name not in the copy reloads it too (at most
once a second), so an endpoint added a moment ago is accepted at once."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator

from api.auth import Principal
from shared.errors import InvalidRequest, Unavailable
from shared.logging import get_logger
from shared.notify import Listener
from shared.webhookstore import CHANNEL, Listing, WebhookStore

log = get_logger("ferry.api")

WEBHOOK = "x-bf-async-webhook"
MAX_AGE_S = 60.0  # the copy is reloaded after this even without a notification
MISS_RELOAD_S = 1.0  # an unknown name reloads the copy at most this often
MAX_NAME = 64


class WebhookDirectory:
    def __init__(self, store: WebhookStore, dsn: str) -> None:
        self._store = store
        self._listings: dict[str, Listing] | None = None
        self._loaded_at = 0.0
        self._stale = True
        self._lock = asyncio.Lock()
        # A reconnect marks the copy stale (changes may have been missed); a lost connection
        # keeps it (names work while the database is away).
        self._listener = Listener(dsn, CHANNEL, self._changed, self._reconnected)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[WebhookDirectory]:
        async with self._listener.running():
            yield self

    def _reconnected(self) -> None:
        self._stale = True

    def _changed(self, _endpoint_id: str) -> None:
        self._stale = True

    async def resolve(self, name: str, principal: Principal) -> uuid.UUID:
        """The id of the endpoint `name`, if it is enabled and this caller's key may use it;
        otherwise a 400 that does not tell which (nor whether another key's exists)."""
        listings = await self._current(name)
        listing = listings.get(name)
        if listing is None or not listing.enabled or (
                listing.key_ids and principal.key_id not in listing.key_ids):
            raise InvalidRequest(f"{WEBHOOK}: no enabled webhook endpoint named "
                                 f"{name[:MAX_NAME]!r} is available to this caller")
        return listing.id

    async def _current(self, name: str) -> dict[str, Listing]:
        now = time.monotonic()
        listings = self._listings
        if listings is not None and not self._stale and now - self._loaded_at < MAX_AGE_S and (
                name in listings or now - self._loaded_at < MISS_RELOAD_S):
            return listings
        async with self._lock:  # concurrent submits share one reload
            if self._listings is not None and self._loaded_at > now:
                return self._listings
            try:
                self._stale = False  # a notification from here on asks for another reload
                self._listings = await self._store.listings()
                self._loaded_at = time.monotonic()
            except Unavailable:
                self._stale = True
                if self._listings is None:
                    raise Unavailable("cannot look up webhook endpoints right now; retry"
                                      ) from None
                log.warning("could not reload webhook endpoints; using the copy held")
            return self._listings


def webhook_name(value: str | None) -> str | None:
    """The header's value, or None when absent."""
    if value is None:
        return None
    name = value.strip()
    if not name or len(name) > MAX_NAME or not name.isascii():
        raise InvalidRequest(f"{WEBHOOK} must name a webhook endpoint (1 to {MAX_NAME} "
                             "ASCII characters)")
    return name
