"""The reconciler: makes every way a job message can be lost end with the job row final.

Each round (one replica at a time, under an advisory lock; any number may run):
1. jobs whose worker stopped renewing its lease are pending again;
2. parked jobs whose delayed message never came back are released;
3. pending jobs published long ago and never picked up, while the jobs queue has nothing
   waiting (so their message cannot be queued still), are released;
4. every released job, and every job whose submit was committed but never confirmed by the
   broker (the api stopped in between), is published again from its stored message.
A duplicate message is harmless: the claim in the job row lets only one worker run a job.

Webhook deliveries are repaired the same way: published when their job's worker stopped
before publishing them, republished when their delayed message is long overdue, or when their
message was lost (nobody sending, the webhooks queue empty).

Next to that, the dead-letter queues are drained in every replica: the broker gave up on those
messages, so their jobs (or deliveries) are failed with an error that says so (never left
silent).
"""

from __future__ import annotations

import asyncio
import uuid

from aio_pika.abc import AbstractIncomingMessage

from shared.batchstore import BatchStore
from shared.broker import Broker, settle
from shared.errors import FerryError, Unavailable
from shared.jobs import format_job_id
from shared.logging import get_logger
from shared.metrics import Metrics
from shared.runtime import wait_set
from shared.settings import Settings
from shared.store import Outcome, Store, StoredMessage, StoreUnavailable
from shared.webhooks import delivery_header_id
from shared.webhookstore import WebhookStore
from shared.wire import ErrorEnvelope
from worker.webhooks import announce

log = get_logger("ferry.reconciler")

RECONCILER_LOCK_KEY = 0x7265636F6E  # "recon"
BATCH = 1000


class Reconciler:
    def __init__(self, settings: Settings, store: Store, broker: Broker,
                 metrics: Metrics | None = None) -> None:
        self._settings = settings
        self._store = store
        self._broker = broker
        self._metrics = metrics or Metrics()
        self._webhooks = WebhookStore(store)
        self._batches = BatchStore(store)

    async def run(self, stop: asyncio.Event) -> None:
        await self._broker.consume_dead_letters(self.on_dead_letter)
        await self._broker.consume_webhook_dead_letters(self.on_webhook_dead_letter)
        log.info("reconciler running", interval_s=self._settings.reconcile_interval_s)
        while not stop.is_set():
            try:
                await self.reconcile_once()
            except (StoreUnavailable, Unavailable) as exc:
                log.warning("reconcile round skipped", error=exc.message)
            except Exception:
                log.exception("reconcile round failed; will try again")
            await wait_set(stop, self._settings.reconcile_interval_s)

    async def reconcile_once(self) -> dict[str, int] | None:
        """One round; None if another replica holds the lock. Returns what it did."""
        s = self._settings
        async with self._store.advisory_lock(RECONCILER_LOCK_KEY) as mine:
            if not mine:
                return None
            expired = await self._store.recover_expired_leases(s.lease_s / 3, BATCH)
            overdue = await self._store.release_overdue_parked(
                max(60.0, s.reconcile_interval_s * 2), BATCH)
            # A pending row published long ago lost its message only if its lane's queue
            # has nothing waiting.
            idle = await self._idle_lanes()
            stale: list[uuid.UUID] = []
            for lane in ("async", "batch"):
                if lane in idle:
                    stale += await self._store.release_stale_pending(
                        s.republish_after_s, BATCH, mode=lane)
            released = expired + overdue + stale
            republished = await self._publish(await self._store.messages(released))
            republished += await self._republish_unpublished(s.outbox_grace_s)
            webhooks = await self._reconcile_webhooks("webhooks" in idle)
            batches_expired = await self._batches.expire_due(BATCH * 10)
            batches_ended = await self._batches.close_ended(BATCH)
        done = {"expired_leases": len(expired), "overdue_parked": len(overdue),
                "stale_pending": len(stale), "republished": republished,
                "webhooks_republished": webhooks, "batch_requests_expired": batches_expired,
                "batches_ended": batches_ended}
        if any(done.values()):
            log.info("reconciled", **done)
            for what, count in done.items():
                self._metrics.reconciled.labels(what).inc(count)
        return done

    async def _reconcile_webhooks(self, queue_idle: bool) -> int:
        """Deliveries never published, overdue from a delay tier, or lost (only looked for
        when the webhooks queue has nothing waiting): published again. Returns how many were
        published."""
        s = self._settings
        store = self._webhooks
        ids = await store.release_overdue(max(60.0, s.reconcile_interval_s * 2), BATCH)
        if queue_idle:
            ids += await store.release_stale(s.republish_after_s, BATCH)
        ids += await store.unpublished(s.outbox_grace_s, BATCH)
        published: list[uuid.UUID] = []
        for delivery_id in dict.fromkeys(ids):
            try:
                await self._broker.publish_webhook(delivery_id)
            except FerryError as exc:
                log.warning("could not republish a webhook delivery", error=exc.message,
                            delivery_id=delivery_header_id(delivery_id))
                break
            published.append(delivery_id)
        if published:
            await store.mark_published(published)
        return len(published)

    async def _idle_lanes(self) -> set[str]:
        """The lanes whose queue has nothing waiting (none while the broker is away)."""
        try:
            depths = await self._broker.queue_depths()
        except Unavailable:
            return set()
        return {lane for lane, depth in depths.items() if depth == 0}

    async def _republish_unpublished(self, grace_s: float) -> int:
        """Jobs committed but never confirmed by the broker (the api stopped in between)."""
        total = 0
        while True:
            rows = await self._store.unpublished(grace_s, BATCH)
            published = await self._publish(rows)
            total += published
            if published < len(rows) or len(rows) < BATCH:
                return total

    async def _publish(self, rows: list[StoredMessage]) -> int:
        """Publish stored messages, each to its lane; mark each once the broker confirmed it."""
        published: list[uuid.UUID] = []
        for row in rows:
            try:
                if row.mode == "batch":
                    if not await self._broker.publish_batch_jobs([row.job_id]):
                        raise Unavailable("the batch queue refused the request")
                else:
                    await self._broker.publish_raw_job(row.job_id, row.message)
            except FerryError as exc:
                log.warning("could not republish a job", job_id=format_job_id(row.job_id),
                            error=exc.message)
                break
            published.append(row.job_id)
        if published:
            await self._store.mark_published(published)
        return len(published)

    async def on_dead_letter(self, message: AbstractIncomingMessage) -> None:
        """The broker gave up on a job message: fail its job, saying why, then drop it."""
        try:
            job_id = uuid.UUID(hex=message.message_id or "")
        except ValueError:
            log.error("undecodable dead letter dropped", message_id=message.message_id)
            await settle(message.ack())
            return
        reason = _death_reason(message)
        error = ErrorEnvelope.of("api_error", "the message broker gave up on the job "
                                 f"({reason}); it was not completed")
        outcome = Outcome(status="failed", body=error.to_json(), attempts=0, http_status=500,
                          error_type="api_error")
        try:
            finished = await self._store.finish_job(job_id, outcome)
        except StoreUnavailable:
            await asyncio.sleep(1)
            await settle(message.nack(requeue=True))
            return
        if finished is not None:
            log.error("dead-lettered job failed", job_id=format_job_id(job_id), reason=reason)
            if finished.delivery_id is not None:
                await announce(self._broker, self._webhooks, finished.delivery_id)
        await settle(message.ack())

    async def on_webhook_dead_letter(self, message: AbstractIncomingMessage) -> None:
        """The broker gave up on a webhook message: fail its delivery, saying why."""
        try:
            delivery_id = uuid.UUID(hex=message.message_id or "")
        except ValueError:
            log.error("undecodable webhook dead letter dropped", message_id=message.message_id)
            await settle(message.ack())
            return
        reason = _death_reason(message)
        try:
            failed = await self._webhooks.fail(
                delivery_id, f"the message broker gave up on the delivery ({reason})")
        except StoreUnavailable:
            await asyncio.sleep(1)
            await settle(message.nack(requeue=True))
            return
        if failed:
            log.error("dead-lettered webhook delivery failed", reason=reason,
                      delivery_id=delivery_header_id(delivery_id))
        await settle(message.ack())


def _death_reason(message: AbstractIncomingMessage) -> str:
    headers = message.headers or {}
    reason = headers.get("x-first-death-reason")
    if isinstance(reason, bytes):
        reason = reason.decode(errors="replace")
    return str(reason) if reason else "unknown reason"
