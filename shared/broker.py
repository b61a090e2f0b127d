"""RabbitMQ: topology, publishing with confirms, consuming. Names are prefixed with the
namespace so several deployments or test runs can share one broker."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)

from shared.errors import Overloaded, Unavailable
from shared.jobs import JobEnvelope, Reply
from shared.settings import Settings

PUBLISH_TIMEOUT_S = 10.0
# Delayed retries wait in one queue per delay: every message in a queue has the same TTL, so
# none waits behind a longer one; on expiry it dead-letters back onto the jobs queue.
DELAY_TIERS_S = (10, 30, 60, 300, 900)


def delay_tier(delay_s: float) -> int:
    return next((tier for tier in DELAY_TIERS_S if tier >= delay_s), DELAY_TIERS_S[-1])

_BROKER_DOWN = (
    aiormq.exceptions.AMQPError,
    aio_pika.exceptions.ChannelInvalidStateError,
    ConnectionError,
    OSError,
    asyncio.TimeoutError,
    RuntimeError,  # aio-pika raises it for a closed connection/channel
)


def job_message(envelope: JobEnvelope) -> aio_pika.Message:
    headers: dict[str, str] = {"model": envelope.model, "provider": envelope.provider,
                               "mode": envelope.mode}
    if envelope.anthropic_version:
        headers["anthropic-version"] = envelope.anthropic_version
    if envelope.anthropic_beta:
        headers["anthropic-beta"] = envelope.anthropic_beta
    if envelope.upstream_model and envelope.upstream_model != envelope.model:
        headers["upstream-model"] = envelope.upstream_model
    if envelope.fallbacks:
        headers["fallbacks"] = " ".join(envelope.fallbacks)
    if envelope.attempt:
        headers["attempt"] = str(envelope.attempt)
    if envelope.caller_hash is not None:
        headers["caller"] = envelope.caller_hash.hex()
    if envelope.pickup_deadline is not None:
        headers["pickup-deadline"] = repr(envelope.pickup_deadline)
    interactive = envelope.reply_to is not None
    return aio_pika.Message(
        envelope.body,
        message_id=envelope.job_id.hex,
        correlation_id=envelope.job_id.hex if interactive else None,
        reply_to=envelope.reply_to,
        content_type="application/json",
        # Interactive requests are not durable work: nobody waits for them after a restart.
        delivery_mode=(aio_pika.DeliveryMode.NOT_PERSISTENT if interactive
                       else aio_pika.DeliveryMode.PERSISTENT),
        headers=headers,  # type: ignore[arg-type]
    )


def job_envelope(message: AbstractIncomingMessage) -> JobEnvelope:
    """Decode a job message; raises ValueError if it is not one."""
    if not message.message_id:
        raise ValueError("job message without message_id")
    headers = message.headers or {}

    def text(name: str) -> str | None:
        value = headers.get(name)
        if isinstance(value, bytes):
            return value.decode()
        return value if isinstance(value, str) else None

    model = text("model")
    if not model:
        raise ValueError("job message without model header")
    caller, deadline = text("caller"), text("pickup-deadline")
    return JobEnvelope(
        job_id=uuid.UUID(hex=message.message_id),
        mode=text("mode") or "async",  # type: ignore[arg-type]
        model=model,
        provider=text("provider") or "anthropic",
        upstream_model=text("upstream-model") or model,
        fallbacks=tuple((text("fallbacks") or "").split()),
        attempt=int(text("attempt") or 0),
        anthropic_version=text("anthropic-version"),
        anthropic_beta=text("anthropic-beta"),
        body=message.body,
        reply_to=message.reply_to,
        caller_hash=bytes.fromhex(caller) if caller else None,
        pickup_deadline=float(deadline) if deadline else None,
    )


def reply_message(job_id: uuid.UUID, reply: Reply) -> aio_pika.Message:
    headers: dict[str, str | int] = {}
    if reply.event is not None:
        headers["event"] = reply.event
    if reply.status is not None:
        headers["status"] = reply.status
    if reply.provider_seconds is not None:
        headers["provider-seconds"] = repr(reply.provider_seconds)
    return aio_pika.Message(
        reply.body, correlation_id=job_id.hex, type=reply.kind, headers=headers,  # type: ignore[arg-type]
        delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT,
    )


def decode_reply(message: AbstractIncomingMessage) -> tuple[str, Reply]:
    """(correlation id, reply); raises ValueError for a message that is not a reply."""
    headers = message.headers or {}
    event = headers.get("event")
    status = headers.get("status")
    provider_s = headers.get("provider-seconds")
    if isinstance(provider_s, bytes):
        provider_s = provider_s.decode()
    reply = Reply(
        kind=message.type,  # type: ignore[arg-type]
        body=message.body,
        event=event.decode() if isinstance(event, bytes) else event,  # type: ignore[arg-type]
        status=status if isinstance(status, int) else None,
        provider_seconds=float(provider_s) if isinstance(provider_s, str) else None,
    )
    if not message.correlation_id:
        raise ValueError("reply without correlation_id")
    return message.correlation_id, reply


class Broker:
    """One robust connection, a confirming publisher channel, and consumer channels."""

    def __init__(self, settings: Settings, connection: AbstractRobustConnection,
                 publisher: AbstractChannel, fast: AbstractChannel) -> None:
        self._settings = settings
        self._connection = connection
        self._publisher = publisher
        self._fast = fast
        self._consumer_channels: list[AbstractChannel] = []

    @classmethod
    async def connect(cls, settings: Settings) -> Broker:
        connection = await aio_pika.connect_robust(
            settings.amqp_url, client_properties={"connection_name": f"ferry:{settings.namespace}"}
        )
        publisher = await connection.channel(publisher_confirms=True, on_return_raises=True)
        # Interactive requests are not durable work: no confirm round trip on their path.
        fast = await connection.channel(publisher_confirms=False)
        broker = cls(settings, connection, publisher, fast)
        await broker.declare_topology(publisher)
        return broker

    async def close(self) -> None:
        await self._connection.close()

    def on_reconnect(self, callback: Callable[[], None]) -> None:
        """Exclusive reply queues lose their messages with the connection: let waiters know."""
        self._connection.reconnect_callbacks.add(lambda *_: callback())

    @property
    def is_connected(self) -> bool:
        return not (self._connection.is_closed or self._publisher.is_closed
                    or self._fast.is_closed)

    async def declare_topology(self, channel: AbstractChannel) -> AbstractQueue:
        """Both lanes. Returns the jobs queue: durable quorum queue whose poison messages
        dead-letter after delivery_limit deliveries."""
        await self.declare_interactive(channel)
        return await self.declare_jobs(channel)

    async def declare_interactive(self, channel: AbstractChannel) -> AbstractQueue:
        """Interactive requests: their own queue (so a job backlog never delays them); the
        messages carry a TTL, so a request nobody picked up in time is dropped, not run."""
        s = self._settings
        await channel.declare_exchange(s.cancel_exchange, aio_pika.ExchangeType.FANOUT,
                                       durable=True)
        return await channel.declare_queue(
            s.interactive_queue, durable=True,
            arguments={"x-queue-type": "classic", "x-overflow": "reject-publish",
                       "x-max-length": s.interactive_max_queued},
        )

    def delay_queue(self, tier: int) -> str:
        return f"{self._settings.jobs_queue}.delay.{tier}s"

    async def declare_delays(self, channel: AbstractChannel) -> None:
        for tier in DELAY_TIERS_S:
            await channel.declare_queue(
                self.delay_queue(tier), durable=True,
                arguments={"x-queue-type": "classic", "x-message-ttl": tier * 1000,
                           "x-dead-letter-exchange": "",
                           "x-dead-letter-routing-key": self._settings.jobs_queue},
            )

    async def declare_jobs(self, channel: AbstractChannel) -> AbstractQueue:
        s = self._settings
        await self.declare_delays(channel)
        dlx = await channel.declare_exchange(
            s.dead_letter_exchange, aio_pika.ExchangeType.FANOUT, durable=True
        )
        dead = await channel.declare_queue(
            s.dead_letter_queue, durable=True, arguments={"x-queue-type": "quorum"}
        )
        await dead.bind(dlx)
        return await channel.declare_queue(
            s.jobs_queue,
            durable=True,
            arguments={
                "x-queue-type": "quorum",
                "x-delivery-limit": s.delivery_limit,
                "x-dead-letter-exchange": s.dead_letter_exchange,
                "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish",
                "x-max-length": s.queue_max_length,
            },
        )

    async def publish_job(self, envelope: JobEnvelope) -> None:
        """Returns once the broker has confirmed the message is stored."""
        try:
            await self._publisher.default_exchange.publish(
                job_message(envelope), routing_key=self._settings.jobs_queue,
                mandatory=True, timeout=PUBLISH_TIMEOUT_S,
            )
        except aio_pika.exceptions.DeliveryError as exc:
            # A nack: with x-overflow=reject-publish this is the queue being full.
            raise Overloaded("the job queue is full; retry later") from exc
        except aio_pika.exceptions.PublishError as exc:
            raise Unavailable("the job queue does not exist; is the broker set up?") from exc
        except _BROKER_DOWN as exc:
            raise Unavailable("the message broker is unavailable; retry later") from exc

    async def publish_delayed(self, envelope: JobEnvelope, delay_s: float) -> None:
        """Park a job for a later attempt; returns once the broker confirmed it."""
        await self._publisher.default_exchange.publish(
            job_message(envelope), routing_key=self.delay_queue(delay_tier(delay_s)),
            mandatory=True, timeout=PUBLISH_TIMEOUT_S,
        )

    async def publish_interactive(self, envelope: JobEnvelope) -> None:
        """Queue a sync/stream request; the broker drops it if no worker takes it in time.
        Unconfirmed: a request the broker refuses (queue full) is simply never picked up,
        and the api answers 529 when the pickup timeout passes."""
        message = job_message(envelope)
        message.expiration = self._settings.pickup_timeout_s
        try:
            await self._fast.default_exchange.publish(
                message, routing_key=self._settings.interactive_queue,
                mandatory=False, timeout=PUBLISH_TIMEOUT_S,
            )
        except _BROKER_DOWN as exc:
            raise Unavailable("the message broker is unavailable; retry later") from exc

    async def publish_cancel(self, job_id: uuid.UUID) -> None:
        """Tell every worker to stop working on this interactive request (best effort)."""
        try:
            exchange = await self._publisher.get_exchange(self._settings.cancel_exchange,
                                                          ensure=False)
            await exchange.publish(aio_pika.Message(b"", correlation_id=job_id.hex),
                                   routing_key="", mandatory=False, timeout=PUBLISH_TIMEOUT_S)
        except (*_BROKER_DOWN, aio_pika.exceptions.DeliveryError):
            pass  # the worker's own deadline still bounds the call

    async def reply_channel(self) -> AbstractChannel:
        """A channel for replies: no confirms (they are not durable), nothing to wait on."""
        channel = await self._connection.channel(publisher_confirms=False)
        self._consumer_channels.append(channel)
        return channel

    async def consume_replies(
        self, handler: Callable[[AbstractIncomingMessage], Awaitable[None]]
    ) -> str:
        """A reply queue for this api process; returns its name (the `reply_to` address)."""
        channel = await self._connection.channel()
        self._consumer_channels.append(channel)
        name = f"{self._settings.namespace}.replies.{uuid.uuid4().hex[:12]}"
        queue = await channel.declare_queue(name, exclusive=True, auto_delete=True)
        await queue.consume(handler, no_ack=True)
        return name

    async def consume_interactive(
        self, handler: Callable[[AbstractIncomingMessage], Awaitable[None]], prefetch: int
    ) -> tuple[AbstractQueue, str]:
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        self._consumer_channels.append(channel)
        queue = await self.declare_interactive(channel)
        tag = await queue.consume(handler, no_ack=False)
        return queue, tag

    async def consume_cancels(
        self, handler: Callable[[AbstractIncomingMessage], Awaitable[None]]
    ) -> None:
        channel = await self._connection.channel()
        self._consumer_channels.append(channel)
        exchange = await channel.declare_exchange(
            self._settings.cancel_exchange, aio_pika.ExchangeType.FANOUT, durable=True
        )
        queue = await channel.declare_queue("", exclusive=True, auto_delete=True)
        await queue.bind(exchange)
        await queue.consume(handler, no_ack=True)

    async def consume_jobs(
        self, handler: Callable[[AbstractIncomingMessage], Awaitable[None]], prefetch: int
    ) -> tuple[AbstractQueue, str]:
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        self._consumer_channels.append(channel)
        queue = await self.declare_jobs(channel)
        tag = await queue.consume(handler, no_ack=False)
        return queue, tag

    async def jobs_queue_depth(self) -> int:
        return (await self.queue_depths())["async"]

    async def queue_depths(self) -> dict[str, int]:
        """Messages ready in each lane's queue (what KEDA's RabbitMQ scaler reads too)."""
        channel = await self._connection.channel()
        try:
            depths = {}
            for lane, name in (("async", self._settings.jobs_queue),
                               ("interactive", self._settings.interactive_queue)):
                queue = await channel.declare_queue(name, passive=True)
                depths[lane] = queue.declaration_result.message_count or 0
            return depths
        finally:
            await channel.close()

    async def delete_topology(self) -> None:
        """Remove every queue and exchange of this namespace (tests clean up with it)."""
        s = self._settings
        channel = await self._connection.channel()
        try:
            for queue in (s.jobs_queue, s.dead_letter_queue, s.interactive_queue,
                          *(self.delay_queue(tier) for tier in DELAY_TIERS_S)):
                await channel.queue_delete(queue)
            for exchange in (s.dead_letter_exchange, s.cancel_exchange):
                await channel.exchange_delete(exchange)
        finally:
            await channel.close()
