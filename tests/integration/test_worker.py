"""The worker in-process, with the real store and broker and the Anthropic provider pointed at
the in-process fake provider."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable

import asyncpg
import orjson
import pytest
from aio_pika.abc import AbstractQueue

from shared.broker import Broker
from shared.jobs import JobEnvelope
from shared.settings import Settings
from shared.store import Claim, Store
from tests.integration.conftest import (
    CALLER,
    UPSTREAM_KEY,
    RunningWorker,
    finished,
    submit,
)
from tests.support import MODEL, eventually, fake_calls, request_body

pytestmark = pytest.mark.integration

StartWorker = Callable[[Settings], Awaitable[RunningWorker]]


def unique(text: str) -> str:
    return f"{text} {uuid.uuid4().hex}"


async def job_row(db: asyncpg.Connection, job_id: uuid.UUID) -> asyncpg.Record:
    row = await db.fetchrow("SELECT * FROM jobs WHERE id = $1", job_id)
    assert row is not None
    return row


async def test_a_job_goes_from_pending_to_completed(
    settings: Callable[..., Settings], store: Store, broker: Broker, db: asyncpg.Connection,
    start_worker: StartWorker, fake_provider: str,
) -> None:
    text = unique("hello there")
    sent = await submit(store, broker, text)
    pending = await store.get_job(sent.job_id, CALLER)
    assert pending is not None and pending.status == "pending"

    worker = await start_worker(settings())
    view = await finished(store, sent.job_id)
    assert (view.status, view.http_status) == ("completed", None)
    assert view.body is not None
    message = orjson.loads(view.body)
    assert message["type"] == "message"
    assert message["content"] == [{"type": "text", "text": f"echo: {text}"}]

    row = await job_row(db, sent.job_id)
    assert (row["status"], row["attempts"], row["deliveries"], row["worker_id"],
            row["stop_reason"], row["output_tokens"]) == (
        "completed", 1, 1, worker.worker.worker_id, "end_turn", len(f"echo: {text}".split()))
    [call] = await fake_calls(fake_provider, text)
    assert call["finished"] and call["model"] == MODEL
    assert call["headers"]["x-api-key"] == UPSTREAM_KEY


@pytest.mark.parametrize(("status", "error_type"), [(400, "invalid_request_error"),
                                                    (403, "permission_error")])
async def test_a_provider_client_error_fails_the_job_without_retrying(
    settings: Callable[..., Settings], store: Store, broker: Broker, db: asyncpg.Connection,
    start_worker: StartWorker, fake_provider: str, status: int, error_type: str,
) -> None:
    text = unique(f"[[fake:status={status}]] refuse")
    sent = await submit(store, broker, text)
    await start_worker(settings())
    view = await finished(store, sent.job_id)
    assert (view.status, view.http_status) == ("failed", status)
    assert view.body is not None
    assert orjson.loads(view.body) == {
        "type": "error",
        "error": {"type": error_type, "message": f"fake provider failure {status}"},
    }
    row = await job_row(db, sent.job_id)
    assert (row["http_status"], row["error_type"], row["attempts"]) == (status, error_type, 1)
    assert len(await fake_calls(fake_provider, text)) == 1


async def test_a_503_that_fails_once_is_retried_and_completes(
    settings: Callable[..., Settings], store: Store, broker: Broker, db: asyncpg.Connection,
    start_worker: StartWorker, fake_provider: str,
) -> None:
    text = unique("[[fake:fail_once=503]] flaky")
    sent = await submit(store, broker, text)
    await start_worker(settings())
    view = await finished(store, sent.job_id)
    assert view.status == "completed"
    assert view.body is not None and "echo: flaky" in view.body
    row = await job_row(db, sent.job_id)
    assert (row["attempts"], row["deliveries"], row["http_status"]) == (2, 1, None)
    assert [c["status"] for c in await fake_calls(fake_provider, text)] == [503, 200]


async def test_an_upstream_that_stays_overloaded_fails_after_the_last_attempt(
    settings: Callable[..., Settings], store: Store, broker: Broker, db: asyncpg.Connection,
    start_worker: StartWorker, fake_provider: str,
) -> None:
    text = unique("[[fake:status=529]] busy")
    sent = await submit(store, broker, text)
    await start_worker(settings(provider_max_attempts=3))
    view = await finished(store, sent.job_id)
    assert (view.status, view.http_status) == ("failed", 529)
    row = await job_row(db, sent.job_id)
    assert (row["attempts"], row["error_type"]) == (3, "overloaded_error")
    assert len(await fake_calls(fake_provider, text)) == 3


async def test_a_message_whose_job_row_never_committed_is_dead_lettered(
    settings: Callable[..., Settings], broker: Broker, db: asyncpg.Connection,
    dead_letters: AbstractQueue, start_worker: StartWorker, fake_provider: str,
) -> None:
    text = unique("orphan")
    # The api published, then its transaction rolled back (it crashed before COMMIT).
    orphan = JobEnvelope(job_id=uuid.uuid4(), model=MODEL, body=request_body(text))
    await broker.publish_job(orphan)
    await start_worker(settings())

    dead = await eventually(lambda: dead_letters.get(no_ack=True, fail=False),
                            what="the orphan message in the dead-letter queue")
    assert dead.message_id == orphan.job_id.hex
    assert await fake_calls(fake_provider, text) == []
    assert await db.fetchval("SELECT count(*) FROM jobs") == 0


async def test_a_redelivered_message_for_a_finished_job_is_acked_without_a_call(
    settings: Callable[..., Settings], store: Store, broker: Broker, db: asyncpg.Connection,
    dead_letters: AbstractQueue, start_worker: StartWorker, fake_provider: str,
) -> None:
    text = unique("only once")
    sent = await submit(store, broker, text)
    worker = await start_worker(settings())
    first = await finished(store, sent.job_id)

    # The same message again, as after an ack lost with a connection.
    await broker.publish_job(sent)
    await eventually(
        lambda: _claims_of(worker, sent.job_id, count=2),
        what="the worker to take the redelivered message",
    )
    assert worker.store.claims[-1] == (sent.job_id, Claim("completed", 1, 3600))
    await worker.shutdown()  # closes its channel: an unacked message would be requeued

    assert await broker.jobs_queue_depth() == 0
    assert await dead_letters.get(no_ack=True, fail=False) is None
    assert len(await fake_calls(fake_provider, text)) == 1
    assert await store.get_job(sent.job_id, CALLER) == first
    assert (await job_row(db, sent.job_id))["deliveries"] == 1


async def test_a_stopped_worker_hands_its_job_back_to_another(
    settings: Callable[..., Settings], store: Store, broker: Broker, db: asyncpg.Connection,
    start_worker: StartWorker, fake_provider: str,
) -> None:
    text = unique("[[fake:delay=1.5]] slow")
    s = settings(shutdown_grace_s=0.1)
    sent = await submit(store, broker, text)
    first = await start_worker(s)

    async def in_flight() -> bool:
        calls = await fake_calls(fake_provider, text)
        return len(calls) == 1 and not calls[0]["finished"]

    await eventually(in_flight, what="the provider call to start")
    await first.shutdown()  # stop.set(): the grace period ends before the call does

    row = await job_row(db, sent.job_id)
    assert (row["status"], row["deliveries"], row["completed_at"]) == ("processing", 1, None)
    [abandoned] = await eventually(lambda: _cancelled_calls(fake_provider, text),
                                   what="the fake provider to see the call abandoned")
    assert not abandoned["finished"]
    assert await broker.jobs_queue_depth() == 1  # handed back, not lost or dead-lettered

    second = await start_worker(s)
    view = await finished(store, sent.job_id)
    assert view.status == "completed"
    assert view.body is not None and "echo: slow" in view.body
    row = await job_row(db, sent.job_id)
    assert (row["deliveries"], row["attempts"], row["worker_id"]) == (
        2, 1, second.worker.worker_id)


async def _claims_of(worker: RunningWorker, job_id: uuid.UUID, count: int) -> bool:
    return sum(1 for claimed, _ in worker.store.claims if claimed == job_id) >= count


async def _cancelled_calls(base_url: str, text: str) -> list[dict[str, object]]:
    return [c for c in await fake_calls(base_url, text) if c["cancelled"]]
