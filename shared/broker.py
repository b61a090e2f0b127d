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
from shared.jobs import JobEnvelope
from shared.settings import Settings

PUBLISH_TIMEOUT_S = 10.0

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
    return aio_pika.Message(
        envelope.body,
        message_id=envelope.job_id.hex,
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
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
    return JobEnvelope(
        job_id=uuid.UUID(hex=message.message_id),
        mode=text("mode") or "async",  # type: ignore[arg-type]
        model=model,
        provider=text("provider") or "anthropic",
        anthropic_version=text("anthropic-version"),
        anthropic_beta=text("anthropic-beta"),
        body=message.body,
    )


class Broker:
    """One robust connection, a confirming publisher channel, and consumer channels."""

    def __init__(self, settings: Settings, connection: AbstractRobustConnection,
                 publisher: AbstractChannel) -> None:
        self._settings = settings
        self._connection = connection
        self._publisher = publisher
        self._consumer_channels: list[AbstractChannel] = []

    @classmethod
    async def connect(cls, settings: Settings) -> Broker:
        connection = await aio_pika.connect_robust(
            settings.amqp_url, client_properties={"connection_name": f"ferry:{settings.namespace}"}
        )
        publisher = await connection.channel(publisher_confirms=True, on_return_raises=True)
        broker = cls(settings, connection, publisher)
        await broker.declare_topology(publisher)
        return broker

    async def close(self) -> None:
        await self._connection.close()

    @property
    def is_connected(self) -> bool:
        return not self._connection.is_closed and not self._publisher.is_closed

    async def declare_topology(self, channel: AbstractChannel) -> AbstractQueue:
        """Durable quorum queue for jobs; poison messages dead-letter after delivery_limit."""
        s = self._settings
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

    async def consume_jobs(
        self, handler: Callable[[AbstractIncomingMessage], Awaitable[None]], prefetch: int
    ) -> tuple[AbstractQueue, str]:
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        self._consumer_channels.append(channel)
        queue = await self.declare_topology(channel)
        tag = await queue.consume(handler, no_ack=False)
        return queue, tag

    async def jobs_queue_depth(self) -> int:
        channel = await self._connection.channel()
        try:
            queue = await channel.declare_queue(self._settings.jobs_queue, passive=True)
            return queue.declaration_result.message_count or 0
        finally:
            await channel.close()

    async def delete_topology(self) -> None:
        """Remove every queue and exchange of this namespace (tests clean up with it)."""
        s = self._settings
        channel = await self._connection.channel()
        try:
            for queue in (s.jobs_queue, s.dead_letter_queue):
                await channel.queue_delete(queue)
            await channel.exchange_delete(s.dead_letter_exchange)
        finally:
            await channel.close()
