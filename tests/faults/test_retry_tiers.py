"""A delayed retry is never dropped: when its TTL runs out while the jobs queue is full, it
waits in its retry tier until there is room (at-least-once dead-lettering; a classic tier would
drop it). On the private node, whose dead-letter worker retries every 2 s instead of every
3 minutes (tests/faults/rmq-node.sh)."""

from __future__ import annotations

import time

import pytest

from shared.broker import Broker, job_envelope
from shared.jobs import JobEnvelope, new_job_id
from shared.settings import Settings
from tests.conftest import TestRun
from tests.faults.services import PrivateRabbit
from tests.support import MODEL, eventually, request_body

pytestmark = [pytest.mark.acceptance, pytest.mark.faults]


def envelope(text: str) -> JobEnvelope:
    return JobEnvelope(job_id=new_job_id(), model=MODEL, body=request_body(text))


async def test_a_delayed_job_waits_for_room_instead_of_being_dropped(
    private_rabbit: PrivateRabbit, test_run: TestRun
) -> None:
    settings = Settings(amqp_url=private_rabbit.url, namespace=test_run.new_namespace("tiers"),
                        queue_max_length=1)
    broker = await Broker.connect(settings)
    try:
        fill = [envelope("filler 1"), envelope("filler 2")]  # a quorum queue takes one extra
        for sent in fill:
            await broker.publish_job(sent)
        parked = envelope("parked")
        await broker.publish_delayed(parked, 1)  # the 10 s tier
        published = time.monotonic()

        async def expired() -> bool:
            # Past its TTL the tier tries the full jobs queue, which refuses it.
            assert await broker.jobs_queue_depth() == 2
            return time.monotonic() - published > 12

        await eventually(expired, timeout=60, what="the parked job's TTL to run out")
        connection = broker.link.connection
        assert connection is not None
        channel = await connection.channel()
        jobs = await channel.declare_queue(settings.jobs_queue, passive=True)
        got = []
        for _ in range(3):  # drain: room appears, and the parked job moves over
            message = await eventually(lambda: jobs.get(fail=False), timeout=60,
                                       what="a job message")
            got.append(job_envelope(message).job_id)
            await message.ack()
        assert got == [fill[0].job_id, fill[1].job_id, parked.job_id]
        await channel.close()
        await broker.delete_topology()
    finally:
        await broker.close()
