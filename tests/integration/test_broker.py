"""The broker against the real RabbitMQ: round trip, backpressure, dead letters."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import aio_pika
import pytest
import pytest_asyncio
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue

from shared.broker import Broker, job_envelope
from shared.errors import Overloaded, Unavailable
from shared.jobs import JobEnvelope, new_job_id
from shared.settings import Settings
from tests.support import MODEL, eventually, request_body

pytestmark = pytest.mark.integration


def envelope(text: str = "hello", **fields: object) -> JobEnvelope:
    values: dict[str, object] = {"model": MODEL, **fields}
    return JobEnvelope(job_id=new_job_id(), body=request_body(text),
                       **values)  # type: ignore[arg-type]


@pytest_asyncio.fixture
async def received(broker: Broker) -> AsyncIterator[asyncio.Queue[AbstractIncomingMessage]]:
    """Messages of the jobs queue, as a consumer gets them (unacknowledged)."""
    inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()

    async def handler(message: AbstractIncomingMessage) -> None:
        await inbox.put(message)

    await broker.consume_jobs(handler, prefetch=10)
    yield inbox


async def test_publish_and_consume_keep_the_body_and_routing(
    broker: Broker, received: asyncio.Queue[AbstractIncomingMessage]
) -> None:
    sent = envelope("héllo wörld", forward_headers=(("anthropic-version", "2023-06-01"),
                                                    ("anthropic-beta", "tools-2024-05-16")),
                    fallbacks=("openai/gpt-5",), query="beta=true", request_id="req_1")
    await broker.publish_job(sent)
    message = await asyncio.wait_for(received.get(), timeout=10)
    assert message.message_id == sent.job_id.hex
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    # Nothing a client controls rides in AMQP headers (a header frame has a size limit).
    assert not message.headers
    assert message.body.endswith(sent.body)  # the client's bytes, after Ferry's header
    assert job_envelope(message) == sent
    await message.ack()


async def test_a_huge_model_name_travels_in_the_body(
    broker: Broker, received: asyncio.Queue[AbstractIncomingMessage]
) -> None:
    sent = envelope("big", model="m" * 300_000)
    await broker.publish_job(sent)  # an AMQP header this size would close the connection
    message = await asyncio.wait_for(received.get(), timeout=10)
    assert job_envelope(message).model == sent.model
    await message.ack()
    assert broker.is_connected


async def test_a_full_queue_raises_overloaded(settings: Callable[..., Settings]) -> None:
    limit = 3
    broker = await Broker.connect(settings(queue_max_length=limit))
    try:
        for _ in range(limit):
            await broker.publish_job(envelope())
        # A quorum queue rejects a publish once it is *over* the limit, so one more may fit.
        with pytest.raises(Overloaded, match="queue is full"):
            for _ in range(2):
                await broker.publish_job(envelope())
        depth = await broker.jobs_queue_depth()
        assert limit <= depth <= limit + 1
        with pytest.raises(Overloaded):
            await broker.publish_job(envelope())
        assert await broker.jobs_queue_depth() == depth
    finally:
        await broker.close()


async def test_a_message_rejected_without_requeue_is_dead_lettered(
    broker: Broker, received: asyncio.Queue[AbstractIncomingMessage],
    dead_letters: AbstractQueue,
) -> None:
    sent = envelope("poison")
    await broker.publish_job(sent)
    message = await asyncio.wait_for(received.get(), timeout=10)
    await message.reject(requeue=False)

    dead = await eventually(lambda: dead_letters.get(no_ack=True, fail=False),
                            what="the message in the dead-letter queue")
    assert dead.message_id == sent.job_id.hex
    assert job_envelope(dead) == sent
    assert await broker.jobs_queue_depth() == 0


async def test_cancelling_a_queue_depth_inquiry_cancels_only_the_caller(broker: Broker) -> None:
    """The stats refresher is cancelled at shutdown wherever it is. A cancel landing on the
    inquiry's channel open used to fail the whole connection, and reach the caller as that
    connection's error rather than as a cancellation (its loop then ran on, and shutdown
    hung)."""
    connection = broker._link.connection
    assert connection is not None
    rounds = 100
    for i in range(rounds):  # cancels spread over the inquiry's steps, ~1 ms apart
        inquiry = asyncio.create_task(broker.queue_depths())
        await asyncio.sleep(i * 0.00005)
        inquiry.cancel()
        done, _ = await asyncio.wait([inquiry], timeout=5)
        assert done, "a cancelled inquiry went on"
        assert inquiry.cancelled() or not isinstance(inquiry.exception(), Exception), \
            f"round {i}: the cancellation came back as {inquiry.exception()!r}"
    assert broker._link.connection is connection and not connection.is_closed
    assert set(await broker.queue_depths()) == {"async", "interactive", "batch", "webhooks"}


async def test_a_job_for_a_missing_queue_is_unavailable_at_once(broker: Broker) -> None:
    """The broker returns a message no queue takes: that is a missing queue, not a full one
    (which a nack says), and no reopening of channels will mend it."""
    with pytest.raises(Unavailable, match="does not exist"):
        await asyncio.wait_for(broker.publish_job(envelope(), routing_key="ferry-no-such-queue"),
                               2)
