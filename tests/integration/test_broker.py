"""The broker against the real RabbitMQ: round trip, backpressure, dead letters."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import aio_pika
import pytest
import pytest_asyncio
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue

from shared.broker import Broker, job_envelope
from shared.errors import Overloaded
from shared.jobs import JobEnvelope, new_job_id
from shared.settings import Settings
from tests.support import MODEL, eventually, request_body

pytestmark = pytest.mark.integration


def envelope(text: str = "hello", **fields: object) -> JobEnvelope:
    return JobEnvelope(job_id=new_job_id(), model=MODEL, body=request_body(text),
                       **fields)  # type: ignore[arg-type]


@pytest_asyncio.fixture
async def received(broker: Broker) -> AsyncIterator[asyncio.Queue[AbstractIncomingMessage]]:
    """Messages of the jobs queue, as a consumer gets them (unacknowledged)."""
    inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()

    async def handler(message: AbstractIncomingMessage) -> None:
        await inbox.put(message)

    await broker.consume_jobs(handler, prefetch=10)
    yield inbox


async def test_publish_and_consume_keep_body_and_headers(
    broker: Broker, received: asyncio.Queue[AbstractIncomingMessage]
) -> None:
    sent = envelope("héllo wörld", anthropic_version="2023-06-01",
                    anthropic_beta="tools-2024-05-16")
    await broker.publish_job(sent)
    message = await asyncio.wait_for(received.get(), timeout=10)
    assert message.body == sent.body
    assert message.message_id == sent.job_id.hex
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.content_type == "application/json"
    headers = message.headers or {}
    assert (headers.get("model"), headers.get("provider"), headers.get("mode"),
            headers.get("anthropic-version"), headers.get("anthropic-beta")) == (
        MODEL, "anthropic", "async", "2023-06-01", "tools-2024-05-16")
    decoded = job_envelope(message)
    assert decoded.job_id == sent.job_id
    assert (decoded.model, decoded.provider, decoded.mode, decoded.body) == (
        sent.model, sent.provider, sent.mode, sent.body)
    assert (decoded.anthropic_version, decoded.anthropic_beta) == (
        "2023-06-01", "tools-2024-05-16")
    await message.ack()


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
    assert dead.body == sent.body
    assert job_envelope(dead).job_id == sent.job_id
    assert await broker.jobs_queue_depth() == 0
