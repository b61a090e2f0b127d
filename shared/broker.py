"""RabbitMQ: topology, publishing with confirms, consuming. Names are prefixed with the
namespace so several deployments or test runs can share one broker.

Queues and why each is what it is (on a cluster, quorum queues are replicated by Raft and
survive the loss of a minority of nodes):
- `<ns>.jobs` (quorum): async jobs. Durable work; never lost once confirmed.
- `<ns>.jobs.retry.<N>s` (quorum, message TTL): jobs parked for a delayed retry; on expiry
  they dead-letter back onto the jobs queue at least once, so a full jobs queue delays them
  instead of dropping them.
- `<ns>.jobs.dead` (quorum): what the broker gave up on; the reconciler fails or republishes
  each job in it, so nothing is left silent.
- `<ns>.interactive`: sync and stream requests. Classic on a single broker (no replication
  to pay for on the fastest path); a quorum queue when AMQP_URL lists several nodes
  (FERRY_INTERACTIVE_QUEUE_TYPE=auto), so the lane survives the loss of the node that would
  otherwise hold it. Requests waiting on a lost connection are answered 503 at once either way.
- `<ns>.batch` (quorum): the requests of Message Batches, a lane of its own with its own
  prefetch in every worker, so a 100,000-request batch never takes the slots of single jobs;
  a message carries only the job id (the request stays in PostgreSQL). `<ns>.batch.retry.<N>s`
  are its delay tiers, as the jobs' ones; what the broker gives up on goes to `<ns>.jobs.dead`.
- `<ns>.webhooks` (quorum): webhook deliveries, a lane of their own; `<ns>.webhooks.retry.<N>s`
  its delay tiers (as the jobs' ones), `<ns>.webhooks.dead` what the broker gave up on.
- reply queues (classic, exclusive, one per api process) and each worker's queue on the cancel
  fanout: they only matter while their process is connected, and are declared again on
  whichever node it reconnects to; losing one loses nothing durable.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractQueue,
)
from aiormq.abc import DeliveredMessage

from shared.amqp import CONNECT_ERRORS, Link, Lost, split_urls
from shared.errors import FerryError, Overloaded, Unavailable
from shared.jobs import JobEnvelope, Reply
from shared.logging import get_logger
from shared.settings import Settings

log = get_logger("ferry.broker")

T = TypeVar("T")

PUBLISH_TIMEOUT_S = 10.0
# Delayed retries wait in one queue per delay: every message in a queue has the same TTL, so
# none waits behind a longer one; on expiry it dead-letters back onto the jobs queue.
DELAY_TIERS_S = (10, 30, 60, 300, 900)
# The broker's own give-up count for a job message. Ferry counts attempts in the job row and
# fails a poison job itself long before this; the broker's limit is only a backstop, set
# explicitly so RabbitMQ 3.x and 4.x (whose default is 20) behave the same.
BROKER_DELIVERY_LIMIT = 100
# Webhook retries wait from 1 s to 30 min: a wait between two tiers is spent in the lower one,
# then the rest of it in the next lower (the delivery row says when it is due).
WEBHOOK_DELAY_TIERS_S = (1, 5, 30, 120, 600)
WEBHOOK_CONTENT_TYPE = "application/x-ferry-webhook"
REOPEN_EVERY_S = 0.25
STALE_RETRY_S = 5.0
JOB_CONTENT_TYPE = "application/x-ferry-job"
BATCH_JOB_CONTENT_TYPE = "application/x-ferry-batch-job"

Handler = Callable[[AbstractIncomingMessage], Awaitable[None]]


class Delivery:
    """A message of one of the two lanes on a sync request's path (a worker's requests, an api's
    replies), taken from aiormq as it arrives. aio-pika's consumer wraps each delivery in an
    IncomingMessage and runs the handler in a task of its own that it then awaits: one more
    turn of the event loop on each of the request's two broker hops, for nothing these
    handlers use. Only what they read is here."""

    __slots__ = ("body", "correlation_id", "message_id", "reply_to", "redelivered",
                 "_channel", "_tag")

    def __init__(self, message: DeliveredMessage) -> None:
        properties = message.header.properties
        self.body: bytes = message.body
        self.correlation_id: str | None = properties.correlation_id
        self.message_id: str | None = properties.message_id
        self.reply_to: str | None = properties.reply_to
        self.redelivered = bool(message.redelivered)
        self._channel = message.channel
        self._tag = message.delivery_tag or 0

    async def ack(self) -> None:
        # Queued for the connection's writer, not waited for: a lost connection loses it
        # anyway, and the broker then delivers the message again.
        await self._channel.basic_ack(self._tag, wait=False)

    async def reject(self, *, requeue: bool) -> None:
        await self._channel.basic_reject(self._tag, requeue=requeue, wait=False)


DeliveryHandler = Callable[[Delivery], Awaitable[None]]
# Lanes consumed as Delivery; every other lane's handler gets aio-pika's IncomingMessage.
_DELIVERY_KINDS = ("interactive", "replies")


def delay_tier(delay_s: float) -> int:
    return next((tier for tier in DELAY_TIERS_S if tier >= delay_s), DELAY_TIERS_S[-1])


def webhook_tier(delay_s: float) -> int:
    """The longest webhook tier that does not overshoot `delay_s` (the shortest, below it)."""
    return max((t for t in WEBHOOK_DELAY_TIERS_S if t <= delay_s),
               default=WEBHOOK_DELAY_TIERS_S[0])


async def _inquire_depths(connection: AbstractConnection, queues: list[str]) -> list[int]:
    """Messages ready in each queue, asked on a channel of its own (a passive declare of a
    missing queue closes its channel)."""
    channel = await connection.channel(publisher_confirms=False)
    try:
        depths = []
        for name in queues:
            declared = await channel.declare_queue(name, passive=True)
            depths.append(declared.declaration_result.message_count or 0)
        return depths
    finally:
        with contextlib.suppress(*CONNECT_ERRORS):
            await channel.close()


async def _uncancellable(inquiry: Coroutine[Any, Any, T]) -> T:
    """Run an inquiry on a channel of its own, which a cancelled caller leaves to finish by
    itself: aiormq answers a channel open cancelled before the broker's open-ok by failing the
    whole connection (the publishers and consumers on it too), and the caller would get that
    connection's error instead of its CancelledError."""
    task = asyncio.ensure_future(inquiry)
    task.add_done_callback(_retrieve)
    return await asyncio.shield(task)


def _retrieve(task: asyncio.Future[Any]) -> None:
    """The outcome of a task its caller may have stopped waiting for is read, so asyncio does
    not log it as never retrieved (a caller still waiting sees it the usual way)."""
    if not task.cancelled():
        task.exception()


class TopologyMismatch(Exception):
    """A queue exists with other arguments (declared by an older Ferry): retrying won't help."""


def job_properties(job_id: uuid.UUID, reply_to: str | None = None,
                   expiration: str | None = None) -> aiormq.spec.Basic.Properties:
    """A job message's properties (its body is the encoded envelope). An async job's message
    is durable; an interactive request's (one with a reply_to) is not: nobody waits for it
    after a restart. It carries its id as the correlation id of the replies, and expires
    (`expiration`, in ms) when no worker took it in time."""
    hex_id = job_id.hex
    if reply_to is None:
        return aiormq.spec.Basic.Properties(message_id=hex_id, content_type=JOB_CONTENT_TYPE,
                                            delivery_mode=2)
    return aiormq.spec.Basic.Properties(message_id=hex_id, correlation_id=hex_id,
                                        reply_to=reply_to, content_type=JOB_CONTENT_TYPE,
                                        delivery_mode=1, expiration=expiration)


def batch_job_properties(job_id: uuid.UUID) -> aiormq.spec.Basic.Properties:
    """A batch request's message is just these, with an empty body: its id (the worker reads
    the request from the store)."""
    return aiormq.spec.Basic.Properties(message_id=job_id.hex,
                                        content_type=BATCH_JOB_CONTENT_TYPE, delivery_mode=2)


def message_job_id(message: AbstractIncomingMessage | Delivery) -> uuid.UUID:
    """The job a message is about; raises ValueError if it names none."""
    try:
        return uuid.UUID(hex=message.message_id or "")
    except ValueError:
        raise ValueError(f"message_id {message.message_id!r} is not a job id") from None


def job_envelope(message: AbstractIncomingMessage | Delivery) -> JobEnvelope:
    """Decode a job message; raises ValueError if it is not one."""
    if not message.message_id:
        raise ValueError("job message without message_id")
    try:
        job_id = uuid.UUID(hex=message.message_id)
    except ValueError:
        raise ValueError(f"job message_id {message.message_id!r} is not a job id") from None
    return JobEnvelope.decode(job_id, message.body, message.reply_to)


def decode_reply(message: AbstractIncomingMessage | Delivery) -> tuple[str, Reply]:
    """(correlation id, reply); raises ValueError for a message that is not a reply."""
    if not message.correlation_id:
        raise ValueError("reply without correlation_id")
    return message.correlation_id, Reply.decode(message.body)


@dataclass
class _Consumer:
    """A consumer to (re)start on every connection."""

    kind: str  # jobs | interactive | batch | cancels | replies | dead | webhooks | webhooks_dead
    handler: Handler | DeliveryHandler
    prefetch: int = 0
    queue: AbstractQueue | None = None
    tag: str | None = None
    channel: AbstractChannel | None = None


async def _declare_delay_tiers(channel: AbstractChannel, tiers: Iterable[int],
                               name_of: Callable[[int], str], target: str) -> None:
    """Delay queues: a message waits out the tier's TTL, then goes back to `target`. At least
    once: an expired message stays in its tier until `target` takes it (it may be full),
    instead of being dropped."""
    for tier in tiers:
        await channel.declare_queue(
            name_of(tier), durable=True,
            arguments={"x-queue-type": "quorum", "x-message-ttl": tier * 1000,
                       "x-dead-letter-exchange": "", "x-dead-letter-routing-key": target,
                       "x-dead-letter-strategy": "at-least-once",
                       "x-overflow": "reject-publish"})


class Broker:
    """Channels on the current connection of a `Link`, rebuilt on every reconnect."""

    def __init__(self, settings: Settings, link: Link) -> None:
        self._settings = settings
        self._link = link
        self._publisher: AbstractChannel | None = None
        self._fast: AbstractChannel | None = None
        self._interactive: AbstractChannel | None = None
        self._reopened_at = 0.0
        self._consumers: list[_Consumer] = []
        self._paused = False
        self.reply_queue = f"{settings.namespace}.replies.{uuid.uuid4().hex[:12]}"
        link.on_up(self._setup)

    @classmethod
    async def connect(cls, settings: Settings, *, role: str = "ferry") -> Broker:
        """Connect (to the first node of AMQP_URL that answers) and declare the topology.
        Raises Unavailable if no node answers, TopologyMismatch if a queue disagrees."""
        link = Link(split_urls(settings.amqp_url), name=f"ferry-{role}:{settings.namespace}",
                    connect_timeout_s=settings.broker_connect_timeout_s,
                    heartbeat_s=settings.broker_heartbeat_s)
        broker = cls(settings, link)
        try:
            await link.start()
        except TopologyMismatch:
            raise
        except (ConnectionError, *CONNECT_ERRORS) as exc:
            raise Unavailable(f"cannot reach the message broker ({exc})") from exc
        return broker

    async def close(self) -> None:
        await self._link.close()

    def on_lost(self, callback: Lost) -> None:
        """Called at once when the connection goes (before it is re-established)."""
        self._link.on_down(callback)

    def on_restored(self, callback: Callable[[], None]) -> None:
        async def setup(_connection: AbstractConnection) -> None:
            callback()
        self._link.on_up(setup)

    @property
    def is_connected(self) -> bool:
        return self._link.is_up

    @property
    def link(self) -> Link:
        return self._link

    # --- topology ------------------------------------------------------------------------

    async def _setup(self, connection: AbstractConnection) -> None:
        try:
            self._publisher = await connection.channel(publisher_confirms=True,
                                                       on_return_raises=True)
            self._fast = await connection.channel(publisher_confirms=False)
            # On a quorum interactive queue, requests are confirmed too: a refusal must be
            # seen (see _publish_confirmed); on a classic one they ride the fast channel.
            self._interactive = (await connection.channel(publisher_confirms=True)
                                 if self._settings.interactive_queue_kind == "quorum"
                                 else self._fast)
            await self.declare_topology(self._publisher)
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            raise TopologyMismatch(
                f"a queue of namespace {self._settings.namespace!r} exists with other "
                f"arguments ({exc}); it was declared by an older Ferry: drain and delete "
                "it, or use another FERRY_NAMESPACE") from exc
        for consumer in self._consumers:
            await self._start_consumer(connection, consumer)

    async def declare_topology(self, channel: AbstractChannel) -> None:
        await self.declare_interactive(channel)
        await self.declare_jobs(channel)
        await self.declare_batch(channel)
        await self.declare_webhooks(channel)

    async def declare_interactive(self, channel: AbstractChannel) -> AbstractQueue:
        """Interactive requests: their own queue (so a job backlog never delays them); the
        messages carry a TTL, so a request nobody picked up in time is dropped, not run."""
        s = self._settings
        await channel.declare_exchange(s.cancel_exchange, aio_pika.ExchangeType.FANOUT,
                                       durable=True)
        return await channel.declare_queue(
            s.interactive_queue, durable=True,
            arguments={"x-queue-type": s.interactive_queue_kind, "x-overflow": "reject-publish",
                       "x-max-length": s.interactive_max_queued},
        )

    def delay_queue(self, tier: int) -> str:
        return f"{self._settings.jobs_queue}.retry.{tier}s"  # as in topology_names

    async def declare_jobs(self, channel: AbstractChannel) -> AbstractQueue:
        s = self._settings
        dlx = await channel.declare_exchange(
            s.dead_letter_exchange, aio_pika.ExchangeType.FANOUT, durable=True
        )
        dead = await channel.declare_queue(
            s.dead_letter_queue, durable=True, arguments={"x-queue-type": "quorum"}
        )
        await dead.bind(dlx)
        jobs = await channel.declare_queue(
            s.jobs_queue,
            durable=True,
            arguments={
                "x-queue-type": "quorum",
                "x-delivery-limit": BROKER_DELIVERY_LIMIT,
                "x-dead-letter-exchange": s.dead_letter_exchange,
                "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish",
                "x-max-length": s.queue_max_length,
            },
        )
        await _declare_delay_tiers(channel, DELAY_TIERS_S, self.delay_queue, s.jobs_queue)
        return jobs

    def batch_delay_queue(self, tier: int) -> str:
        return f"{self._settings.batch_queue}.retry.{tier}s"  # as in topology_names

    async def declare_batch(self, channel: AbstractChannel) -> AbstractQueue:
        """The batch lane: as the jobs queue (the dead-letter exchange declared with it), with
        delay tiers of its own that lead back to it."""
        s = self._settings
        await self.declare_jobs(channel)
        queue = await channel.declare_queue(
            s.batch_queue, durable=True,
            arguments={"x-queue-type": "quorum", "x-delivery-limit": BROKER_DELIVERY_LIMIT,
                       "x-dead-letter-exchange": s.dead_letter_exchange,
                       "x-dead-letter-strategy": "at-least-once",
                       "x-overflow": "reject-publish", "x-max-length": s.queue_max_length})
        await _declare_delay_tiers(channel, DELAY_TIERS_S, self.batch_delay_queue,
                                   s.batch_queue)
        return queue

    def webhook_delay_queue(self, tier: int) -> str:
        return f"{self._settings.webhooks_queue}.retry.{tier}s"  # as in topology_names

    async def declare_webhooks(self, channel: AbstractChannel) -> AbstractQueue:
        """Webhook deliveries: their own queue, delay tiers and dead-letter queue, so they
        never wait behind jobs, nor jobs behind them."""
        s = self._settings
        await channel.declare_queue(s.webhooks_dead_queue, durable=True,
                                    arguments={"x-queue-type": "quorum"})
        queue = await channel.declare_queue(
            s.webhooks_queue, durable=True,
            arguments={"x-queue-type": "quorum", "x-delivery-limit": BROKER_DELIVERY_LIMIT,
                       "x-dead-letter-exchange": "",
                       "x-dead-letter-routing-key": s.webhooks_dead_queue,
                       "x-dead-letter-strategy": "at-least-once",
                       "x-overflow": "reject-publish"})
        await _declare_delay_tiers(channel, WEBHOOK_DELAY_TIERS_S, self.webhook_delay_queue,
                                   s.webhooks_queue)
        return queue

    # --- publishing ------------------------------------------------------------------------

    def _channel(self, fast: bool = False) -> AbstractChannel:
        channel = self._fast if fast else self._publisher
        return self._usable(channel)

    def _usable(self, channel: AbstractChannel | None) -> AbstractChannel:
        if channel is None or channel.is_closed or not self._link.is_up:
            raise Unavailable("the message broker is unavailable; retry later")
        return channel

    async def publish_job(self, envelope: JobEnvelope, *, routing_key: str | None = None) -> None:
        """Returns once the broker has confirmed the message is stored."""
        await self._publish_confirmed(envelope.encode(),
                                      job_properties(envelope.job_id, envelope.reply_to),
                                      routing_key)

    async def publish_raw_job(self, job_id: uuid.UUID, body: bytes) -> None:
        """Publish a job message kept by the outbox (its encoded envelope)."""
        await self._publish_confirmed(body, job_properties(job_id), None)

    async def _publish_confirmed(self, body: bytes, properties: aiormq.spec.Basic.Properties,
                                 routing_key: str | None) -> None:
        queue = routing_key or self._settings.jobs_queue
        try:
            await self._confirmed(lambda: self._channel(), body, properties, queue,
                                  mandatory=True)
        except aio_pika.exceptions.PublishError as exc:  # a return (a DeliveryError too)
            raise Unavailable("the job queue does not exist; is the broker set up?") from exc
        except aio_pika.exceptions.DeliveryError as exc:
            # A nack: with x-overflow=reject-publish this is the queue being full.
            raise Overloaded("the job queue is full; retry later") from exc
        except CONNECT_ERRORS as exc:
            raise Unavailable("the message broker is unavailable; retry later") from exc

    async def _confirmed(self, channel: Callable[[], AbstractChannel], body: bytes,
                         properties: aiormq.spec.Basic.Properties, queue: str, *,
                         mandatory: bool) -> None:
        """Publish with a confirm. A nack from a queue that is not full means the channel is
        stuck on a quorum queue's old leader (RabbitMQ 3.10 sets a channel's queue client up
        from the queue record, which for a moment after a node died still names it): the
        publishing channels are reopened and the message sent again, for a few seconds."""
        deadline = time.monotonic() + STALE_RETRY_S
        while True:
            try:
                await _send(channel(), body, "", queue, properties, mandatory=mandatory)
                return
            except aio_pika.exceptions.PublishError:
                raise  # returned: no such queue, which no reopening mends
            except aio_pika.exceptions.DeliveryError:
                if time.monotonic() > deadline or not await self._reopen_if_stale(queue):
                    raise
                await asyncio.sleep(REOPEN_EVERY_S)

    async def _reopen_if_stale(self, queue: str) -> bool:
        connection = self._link.connection
        if connection is None:
            return False
        limit = (self._settings.queue_max_length
                 if queue in (self._settings.jobs_queue, self._settings.batch_queue)
                 else self._settings.interactive_max_queued
                 if queue == self._settings.interactive_queue else None)
        if limit is not None:
            try:
                depth = await self._depth(connection, queue)
            except CONNECT_ERRORS:
                return False
            if depth >= limit:
                return False  # really full
        if time.monotonic() - self._reopened_at > REOPEN_EVERY_S:
            self._reopened_at = time.monotonic()
            log.warning("a queue refused a publish without being full; reopening the "
                        "publishing channels", queue=queue)
            old = [c for c in {self._publisher, self._interactive} if c is not None]
            self._publisher = await connection.channel(publisher_confirms=True,
                                                       on_return_raises=True)
            if self._interactive is not self._fast:
                self._interactive = await connection.channel(publisher_confirms=True)
            for channel in old:
                if channel is not self._fast:
                    with contextlib.suppress(*CONNECT_ERRORS):
                        await channel.close()
        return True

    @staticmethod
    async def _depth(connection: AbstractConnection, queue: str) -> int:
        [depth] = await _uncancellable(_inquire_depths(connection, [queue]))
        return depth

    async def publish_delayed(self, envelope: JobEnvelope, delay_s: float) -> None:
        """Park a job for a later attempt (in its own lane's delay tier); returns once the
        broker confirmed it."""
        tier = delay_tier(delay_s)
        if envelope.mode == "batch":
            await self._publish_confirmed(b"", batch_job_properties(envelope.job_id),
                                          self.batch_delay_queue(tier))
        else:
            await self.publish_job(envelope, routing_key=self.delay_queue(tier))

    async def publish_batch_jobs(self, ids: list[uuid.UUID], window: int = 256
                                 ) -> list[uuid.UUID]:
        """Queue batch requests, up to `window` confirms outstanding at once; returns the ids
        the broker confirmed (in order), stopping at the first refusal."""
        confirmed: list[uuid.UUID] = []
        for start in range(0, len(ids), window):
            chunk = ids[start:start + window]
            results = await asyncio.gather(
                *(self._publish_confirmed(b"", batch_job_properties(job_id),
                                          self._settings.batch_queue)
                  for job_id in chunk), return_exceptions=True)
            for job_id, result in zip(chunk, results, strict=True):
                if isinstance(result, BaseException):
                    if not isinstance(result, FerryError):
                        raise result
                    return confirmed
                confirmed.append(job_id)
        return confirmed

    async def publish_webhook(self, delivery_id: uuid.UUID, delay_s: float = 0.0) -> None:
        """Queue a webhook delivery (after `delay_s`: in the tier that does not overshoot
        it); returns once the broker confirmed it."""
        queue = (self.webhook_delay_queue(webhook_tier(delay_s)) if delay_s > 0
                 else self._settings.webhooks_queue)
        properties = aiormq.spec.Basic.Properties(message_id=delivery_id.hex,
                                                  content_type=WEBHOOK_CONTENT_TYPE,
                                                  delivery_mode=2)
        try:
            await self._confirmed(lambda: self._channel(), b"", properties, queue,
                                  mandatory=True)
        except aio_pika.exceptions.DeliveryError as exc:  # a nack, or a return
            raise Unavailable(f"the broker refused a webhook delivery ({exc})") from exc
        except CONNECT_ERRORS as exc:
            raise Unavailable("the message broker is unavailable; retry later") from exc

    async def publish_interactive(self, envelope: JobEnvelope) -> None:
        """Queue a sync/stream request; the broker drops it if no worker takes it in time.
        On a classic queue, unconfirmed: a request the broker refuses (queue full) is simply
        never picked up, and the api answers 529 when the pickup timeout passes. On a
        quorum queue (a cluster), confirmed: a refusal is a 529 at once."""
        queue = self._settings.interactive_queue
        properties = job_properties(envelope.job_id, envelope.reply_to,
                                    str(int(self._settings.pickup_timeout_s * 1000)))
        try:
            if self._interactive is self._fast:
                await _send(self._channel(fast=True), envelope.encode(), "", queue, properties)
            else:
                await self._confirmed(lambda: self._usable(self._interactive), envelope.encode(),
                                      properties, queue, mandatory=False)
        except aio_pika.exceptions.DeliveryError as exc:
            raise Overloaded("too many requests are waiting for a worker; retry later",
                             headers={"retry-after": "1"}) from exc
        except CONNECT_ERRORS as exc:
            raise Unavailable("the message broker is unavailable; retry later") from exc

    async def publish_cancel(self, job_id: uuid.UUID) -> None:
        """Tell every worker to stop (or never start) this interactive request; best effort."""
        with contextlib.suppress(Unavailable, *CONNECT_ERRORS):
            await _send(self._channel(fast=True), b"", self._settings.cancel_exchange, "",
                        aiormq.spec.Basic.Properties(correlation_id=job_id.hex,
                                                     delivery_mode=1))

    async def publish_reply(self, channel: AbstractChannel, reply_to: str, job_id: uuid.UUID,
                            reply: Reply) -> None:
        await _send(channel, reply.encode(), "", reply_to, aiormq.spec.Basic.Properties(
            correlation_id=job_id.hex, delivery_mode=1))

    # --- consuming -------------------------------------------------------------------------

    async def _start_consumer(self, connection: AbstractConnection, consumer: _Consumer) -> None:
        s = self._settings
        channel = await connection.channel(publisher_confirms=False)
        consumer.channel = channel
        if consumer.prefetch:
            await channel.set_qos(prefetch_count=consumer.prefetch)
        no_ack = False
        if consumer.kind == "jobs":
            queue = await self.declare_jobs(channel)
        elif consumer.kind == "interactive":
            queue = await self.declare_interactive(channel)
        elif consumer.kind == "dead":
            queue = await channel.declare_queue(s.dead_letter_queue, passive=True)
        elif consumer.kind == "batch":
            queue = await self.declare_batch(channel)
        elif consumer.kind == "webhooks":
            queue = await self.declare_webhooks(channel)
        elif consumer.kind == "webhooks_dead":
            queue = await channel.declare_queue(s.webhooks_dead_queue, passive=True)
        elif consumer.kind == "replies":
            queue = await channel.declare_queue(self.reply_queue, exclusive=True,
                                                auto_delete=True)
            no_ack = True
        else:  # cancels: every worker gets every cancel
            exchange = await channel.declare_exchange(
                s.cancel_exchange, aio_pika.ExchangeType.FANOUT, durable=True)
            queue = await channel.declare_queue("", exclusive=True, auto_delete=True)
            await queue.bind(exchange)
            no_ack = True
        consumer.queue = queue
        if not self._paused:
            consumer.tag = await _consume(channel, queue, consumer, no_ack)

    async def _add_consumer(self, consumer: _Consumer) -> _Consumer:
        self._consumers.append(consumer)
        connection = self._link.connection
        if connection is not None:
            await self._start_consumer(connection, consumer)
        return consumer

    async def consume_replies(self, handler: DeliveryHandler) -> str:
        """This api process's reply queue; returns its name (the `reply_to` address). The
        name stays the same across reconnects."""
        await self._add_consumer(_Consumer("replies", handler))
        return self.reply_queue

    async def consume_interactive(self, handler: DeliveryHandler, prefetch: int) -> None:
        await self._add_consumer(_Consumer("interactive", handler, prefetch))

    async def consume_cancels(self, handler: Handler) -> None:
        await self._add_consumer(_Consumer("cancels", handler))

    async def consume_jobs(self, handler: Handler, prefetch: int) -> None:
        await self._add_consumer(_Consumer("jobs", handler, prefetch))

    async def consume_dead_letters(self, handler: Handler, prefetch: int = 16) -> None:
        await self._add_consumer(_Consumer("dead", handler, prefetch))

    async def consume_batch(self, handler: Handler, prefetch: int) -> None:
        await self._add_consumer(_Consumer("batch", handler, prefetch))

    async def consume_webhooks(self, handler: Handler, prefetch: int) -> None:
        await self._add_consumer(_Consumer("webhooks", handler, prefetch))

    async def consume_webhook_dead_letters(self, handler: Handler, prefetch: int = 16) -> None:
        await self._add_consumer(_Consumer("webhooks_dead", handler, prefetch))

    async def stop_consuming(self, kinds: tuple[str, ...] = ("jobs", "interactive", "batch",
                                                            "webhooks")) -> None:
        """Stop taking new messages of these kinds (shutdown); unacked ones stay ours."""
        self._paused = True
        for consumer in self._consumers:
            if consumer.kind in kinds and consumer.queue is not None and consumer.tag:
                with contextlib.suppress(*CONNECT_ERRORS):
                    await consumer.queue.cancel(consumer.tag)
                consumer.tag = None

    def reply_channel(self) -> AbstractChannel:
        """The channel to publish replies on (no confirms: they are not durable)."""
        return self._channel(fast=True)

    # --- inspection ------------------------------------------------------------------------

    async def queue_depths(self) -> dict[str, int]:
        """Messages ready in each lane's queue (what KEDA's RabbitMQ scaler reads too)."""
        connection = self._link.connection
        if connection is None:
            raise Unavailable("the message broker is unavailable")
        s = self._settings
        lanes = {"async": s.jobs_queue, "interactive": s.interactive_queue,
                 "batch": s.batch_queue, "webhooks": s.webhooks_queue}
        depths = await _uncancellable(_inquire_depths(connection, list(lanes.values())))
        return dict(zip(lanes, depths, strict=True))

    async def jobs_queue_depth(self) -> int:
        return (await self.queue_depths())["async"]

    async def delete_topology(self) -> None:
        """Remove every queue and exchange of this namespace (tests clean up with it)."""
        connection = self._link.connection
        if connection is None:
            raise Unavailable("the message broker is unavailable")
        channel = await connection.channel()
        try:
            await delete_topology(channel, self._settings)
        finally:
            with contextlib.suppress(*CONNECT_ERRORS):
                await channel.close()


async def _consume(channel: AbstractChannel, queue: AbstractQueue, consumer: _Consumer,
                   no_ack: bool) -> str:
    """Start `consumer` on `queue`; returns its consumer tag."""
    if consumer.kind not in _DELIVERY_KINDS:
        return await queue.consume(consumer.handler, no_ack=no_ack)  # type: ignore[arg-type]
    handler: DeliveryHandler = consumer.handler  # type: ignore[assignment]

    async def deliver(message: DeliveredMessage) -> None:
        await handler(Delivery(message))

    underlay = await channel.get_underlay_channel()
    ok = await underlay.basic_consume(queue.name, deliver, no_ack=no_ack)
    return str(ok.consumer_tag)


async def _send(channel: AbstractChannel, body: bytes, exchange: str, routing_key: str,
                properties: aiormq.spec.Basic.Properties, *, mandatory: bool = False) -> None:
    """A publish straight through aiormq: the frames are queued for the connection's writer,
    instead of holding the channel's lock until the socket has drained, so concurrent
    publishes do not queue behind each other's writes. On a channel without confirms that is
    the whole call (sync/stream requests, replies, cancels; nothing is lost by it: such a
    message was never known to have reached the broker anyway, and a lost connection fails
    every waiter); on one with confirms it returns once the broker confirmed, and raises
    DeliveryError for a nack and PublishError for a return (the channel's on_return_raises),
    as aio_pika's Exchange.publish would, from properties built as aiormq sends them."""
    if channel.is_closed:
        raise aiormq.exceptions.ChannelInvalidStateError(f"{channel!r} closed")
    underlay = await channel.get_underlay_channel()
    await underlay.basic_publish(  # type: ignore[call-arg]  # `wait`: aiormq's, not its ABC's
        body, exchange=exchange, routing_key=routing_key, properties=properties,
        mandatory=mandatory, timeout=PUBLISH_TIMEOUT_S, wait=False)


def topology_names(settings: Settings) -> tuple[list[str], list[str]]:
    """(queues, exchanges) of a namespace."""
    queues = [settings.jobs_queue, settings.dead_letter_queue, settings.interactive_queue,
              *(f"{settings.jobs_queue}.retry.{tier}s" for tier in DELAY_TIERS_S),
              settings.batch_queue,
              *(f"{settings.batch_queue}.retry.{tier}s" for tier in DELAY_TIERS_S),
              settings.webhooks_queue, settings.webhooks_dead_queue,
              *(f"{settings.webhooks_queue}.retry.{t}s" for t in WEBHOOK_DELAY_TIERS_S)]
    return queues, [settings.dead_letter_exchange, settings.cancel_exchange]


async def delete_topology(channel: AbstractChannel, settings: Settings) -> None:
    queues, exchanges = topology_names(settings)
    for queue in queues:
        await channel.queue_delete(queue)
    for exchange in exchanges:
        await channel.exchange_delete(exchange)


async def settle(action: Awaitable[object]) -> bool:
    """Ack/nack on a channel that may already be closed (the broker then redelivers the
    message anyway). Returns whether it went through."""
    try:
        await action
    except (*CONNECT_ERRORS, asyncio.CancelledError) as exc:
        if isinstance(exc, asyncio.CancelledError):
            raise
        log.debug("could not settle a message; the broker will redeliver it", error=str(exc))
        return False
    return True
