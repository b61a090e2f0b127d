"""Webhook deliveries: a lane of their own on `<ns>.webhooks`, with its own prefetch
(FERRY_WEBHOOK_CONCURRENCY) and its own HTTP client, so a slow or hanging receiver occupies
webhook slots only, never a job's.

A message names a delivery; the delivery row is the truth. For each message:
1. claim the row for one attempt (a lease, and the attempt's row, in one statement). A row
   delivered or failed already, or gone, needs nothing: ack. One another worker is sending:
   wait for its lease, as for jobs. One not due yet: wait here if that is under a second,
   else park the message in the delay tier that does not overshoot, and ack.
2. POST the stored payload, signed afresh (the same `webhook-id` every time), within
   FERRY_WEBHOOK_TIMEOUT; redirects are not followed, and only the start of a non-2xx body is
   read. 2xx: delivered. 5xx, 408, 429, a timeout or a connection error: retried after
   base·2ⁿ (with jitter, `retry-after` honoured, capped) until FERRY_WEBHOOK_MAX_ATTEMPTS.
   Another answer: failed at once.
3. record the attempt and the delivery's state, then wait or park as in 1, or ack.
A worker killed mid-attempt leaves its message unacked: the broker gives it to another worker,
which takes the delivery over once the lease runs out.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
import structlog
from aio_pika.abc import AbstractIncomingMessage

from shared import webhooks
from shared.broker import WEBHOOK_DELAY_TIERS_S, Broker, settle
from shared.errors import FerryError, Unavailable
from shared.jobs import format_job_id
from shared.logging import get_logger
from shared.metrics import Metrics
from shared.settings import Settings
from shared.webhookstore import DeliveryClaim, DeliveryState, WebhookStore

log = get_logger("ferry.webhooks")

T = TypeVar("T")

INLINE_WAIT_MAX_S = float(WEBHOOK_DELAY_TIERS_S[0])  # a shorter wait holds the message
LEASE_MARGIN_S = 2.0  # an attempt's lease: the timeout, and time to record what it found
EXCERPT_BYTES = 300  # of a non-2xx answer's body, kept with the attempt
_STORE_TRIES = 6
_STATE: dict[webhooks.Verdict, DeliveryState] = {
    "delivered": "delivered", "retry": "pending", "failed": "failed"}


async def announce(broker: Broker, store: WebhookStore, delivery_id: uuid.UUID) -> None:
    """Publish a new delivery (a job just ended). Best effort: one the broker did not confirm
    is published by the reconciler after FERRY_OUTBOX_GRACE."""
    try:
        await broker.publish_webhook(delivery_id)
        await store.mark_published([delivery_id])
    except FerryError as exc:
        log.warning("could not publish a webhook delivery; the reconciler will",
                    delivery_id=webhooks.delivery_header_id(delivery_id), error=exc.message)


def client_session(settings: Settings) -> aiohttp.ClientSession:
    """The lane's own HTTP client: at most FERRY_WEBHOOK_CONCURRENCY connections, no cookies
    kept between receivers, nothing taken from the environment (proxies, netrc)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=settings.webhook_concurrency),
        cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False, trust_env=False,
        timeout=aiohttp.ClientTimeout(total=settings.webhook_timeout_s))


@dataclass
class _Running:
    """A delivery this worker is handling, and every message for it that it holds."""

    messages: list[AbstractIncomingMessage]
    attempt: int = 0  # the attempt under way, if any (handed back on shutdown)
    task: asyncio.Task[None] | None = field(default=None, repr=False)


class WebhookSender:
    def __init__(self, settings: Settings, store: WebhookStore, broker: Broker,
                 session: aiohttp.ClientSession, worker_id: str,
                 spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]],
                 metrics: Metrics) -> None:
        self._settings = settings
        self._store = store
        self._broker = broker
        self._session = session
        self._worker_id = worker_id
        self._spawn = spawn
        self._metrics = metrics
        self._running: dict[uuid.UUID, _Running] = {}

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            delivery_id = uuid.UUID(hex=message.message_id or "")
        except ValueError:
            log.error("undecodable webhook message, dead-lettering",
                      message_id=message.message_id)
            await settle(message.reject(requeue=False))
            return
        running = self._running.get(delivery_id)
        if running is not None:  # a copy of one being handled: settled with it
            running.messages.append(message)
            return
        running = self._running[delivery_id] = _Running([message])
        running.task = self._spawn(self._handle(delivery_id, running))

    async def _handle(self, delivery_id: uuid.UUID, running: _Running) -> None:
        structlog.contextvars.bind_contextvars(
            worker_id=self._worker_id, delivery_id=webhooks.delivery_header_id(delivery_id))
        try:
            await self._deliver(delivery_id, running)
            ack = True
        except asyncio.CancelledError:
            await asyncio.shield(self._hand_back(delivery_id, running))
            raise
        except Unavailable as exc:
            log.warning("webhook delivery handed back: a dependency is unavailable",
                        error=exc.message)
            await asyncio.sleep(1.0)
            ack = False
        except Exception:
            log.exception("webhook delivery failed unexpectedly")
            ack = await self._fail_internal(delivery_id)
        self._running.pop(delivery_id, None)
        for message in running.messages:
            await settle(message.ack() if ack else message.nack(requeue=True))

    async def _deliver(self, delivery_id: uuid.UUID, running: _Running) -> None:
        lease_s = self._settings.webhook_timeout_s + LEASE_MARGIN_S
        seen_lease = None
        while True:
            claim = await self._retrying(
                lambda: self._store.claim(delivery_id, self._worker_id, lease_s))
            if claim.state == "claimed":
                running.attempt = claim.attempt
                wait = await self._attempt(delivery_id, claim)
                running.attempt = 0
                if wait is None:
                    return
            elif claim.state == "held":
                if seen_lease is not None and claim.lease_until != seen_lease:
                    log.info("duplicate webhook message: another worker is sending it")
                    return
                # Its worker may be dead (the broker gave us its message): wait its lease out.
                seen_lease = claim.lease_until
                await asyncio.sleep(claim.remaining_s + random.uniform(0.05, 0.3))
                continue
            elif claim.state == "early":
                wait = claim.remaining_s
            elif claim.state == "endpoint_off":
                await self._store.fail(delivery_id, "the endpoint was disabled or removed")
                log.info("webhook delivery failed: its endpoint was disabled or removed")
                return
            else:  # missing, or delivered / failed already
                return
            if wait <= INLINE_WAIT_MAX_S:
                await asyncio.sleep(max(wait, 0.0))
                continue
            await self._broker.publish_webhook(delivery_id, wait)
            return

    async def _attempt(self, delivery_id: uuid.UUID, claim: DeliveryClaim) -> float | None:
        """Send attempt `claim.attempt` and record it; the wait before the next attempt, or
        None when the delivery is final."""
        s = self._settings
        status: int | None = None
        error: str | None = None
        retry_after: str | None = None
        headers = webhooks.request_headers(claim.secrets, delivery_id, int(time.time()),
                                           claim.payload)
        started = time.monotonic()
        try:
            async with asyncio.timeout(s.webhook_timeout_s), self._session.post(
                    claim.url, data=claim.payload, headers=headers,
                    allow_redirects=False) as response:
                status = response.status
                retry_after = response.headers.get("retry-after")
                if not 200 <= status < 300:
                    body = await response.content.read(EXCERPT_BYTES)
                    error = body.decode("utf-8", "replace") or None
        except TimeoutError:
            error = f"no answer within {s.webhook_timeout_s:g} s (FERRY_WEBHOOK_TIMEOUT)"
        except (aiohttp.ClientError, ValueError) as exc:
            error = f"{type(exc).__name__}: {exc}"[:EXCERPT_BYTES]
        elapsed = time.monotonic() - started
        verdict = webhooks.verdict(status)
        delay = 0.0
        if verdict == "retry" and claim.attempt >= s.webhook_max_attempts:
            verdict = "failed"
        elif verdict == "retry":
            delay = webhooks.retry_delay(claim.attempt, s.webhook_retry_base_s,
                                         s.webhook_retry_max_s)
            hint = webhooks.retry_after_s(retry_after) if status in (429, 503) else None
            if hint is not None:
                delay = min(max(delay, hint), s.webhook_retry_max_s)
        state = _STATE[verdict]
        recorded = await self._retrying(lambda: self._store.record(
            delivery_id, claim.attempt, duration_ms=round(elapsed * 1000), status_code=status,
            error=error, state=state, retry_in_s=delay))
        self._metrics.webhook_attempts.labels(verdict).inc()
        self._metrics.webhook_attempt_seconds.observe(elapsed)
        log.info("webhook attempt", job_id=format_job_id(claim.job_id) if claim.job_id else None,
                 attempt=claim.attempt, status=status, error=error, result=verdict,
                 duration_ms=round(elapsed * 1000),
                 retry_in_s=round(delay, 2) if verdict == "retry" else None)
        if not recorded:
            log.warning("another worker took the webhook delivery over meanwhile")
            return None
        return delay if verdict == "retry" else None

    async def _hand_back(self, delivery_id: uuid.UUID, running: _Running) -> None:
        """Shutdown past the grace period: the next worker need not wait for the lease."""
        if running.attempt:
            try:
                await asyncio.wait_for(self._store.release(delivery_id, running.attempt), 5)
            except (FerryError, TimeoutError):
                pass  # its lease runs out instead
        for message in running.messages:
            await settle(message.nack(requeue=True))
        self._running.pop(delivery_id, None)

    async def _fail_internal(self, delivery_id: uuid.UUID) -> bool:
        """A bug met while delivering: fail the delivery visibly rather than loop on it."""
        try:
            await asyncio.wait_for(
                self._store.fail(delivery_id, "internal error in the worker"), 10)
        except Exception:
            log.exception("could not fail the webhook delivery; handing it back")
            return False
        return True

    async def _retrying(self, call: Callable[[], Awaitable[T]]) -> T:
        """A store call, tried again for a few seconds while the database is away (the
        message is held meanwhile; after that it is handed back)."""
        delay = 0.2
        for _ in range(_STORE_TRIES - 1):
            try:
                return await call()
            except Unavailable as exc:
                log.warning("database unavailable; retrying", error=exc.message)
                await asyncio.sleep(delay)
                delay *= 2
        return await call()
