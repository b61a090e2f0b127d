"""The worker and the reconciler in-process, with the real store and broker and the Anthropic
provider pointed at the in-process fake provider."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import orjson
import pytest
from aio_pika.abc import AbstractQueue

from shared.broker import Broker
from shared.jobs import JobEnvelope
from shared.settings import Settings
from shared.store import Claim, Finished, Outcome, Store, StoreUnavailable
from tests.integration.conftest import (
    CALLER,
    UPSTREAM_KEY,
    ObservedStore,
    RunningWorker,
    finished,
    submit,
)
from tests.support import MODEL, eventually, fake_calls, request_body
from worker.reconciler import Reconciler

pytestmark = pytest.mark.integration

StartWorker = Callable[..., Awaitable[RunningWorker]]


def unique(text: str) -> str:
    return f"{text} {uuid.uuid4().hex}"


def without_request_id(body: str | bytes) -> Any:
    data = orjson.loads(body)
    if isinstance(data, dict):
        data.pop("request_id", None)
    return data


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
    assert (row["status"], row["attempts"], row["deliveries"], row["abandoned"],
            row["worker_id"], row["stop_reason"], row["output_tokens"]) == (
        "completed", 1, 1, 0, worker.worker.worker_id, "end_turn",
        len(f"echo: {text}".split()))
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
    # The provider's own error body, as it sent it.
    assert without_request_id(view.body) == {
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


async def test_a_message_whose_job_was_withdrawn_is_dropped_without_a_call(
    settings: Callable[..., Settings], broker: Broker, db: asyncpg.Connection,
    dead_letters: AbstractQueue, start_worker: StartWorker, fake_provider: str,
) -> None:
    text = unique("orphan")
    # A confirm got lost, so the api withdrew the row and answered an error: nothing runs.
    orphan = JobEnvelope(job_id=uuid.uuid4(), model=MODEL, body=request_body(text))
    await broker.publish_job(orphan)
    worker = await start_worker(settings())
    await eventually(lambda: _claims_of(worker, orphan.job_id, count=1),
                     what="the worker to look at the orphan")
    assert worker.store.claims[-1] == (orphan.job_id, Claim("missing"))
    await worker.shutdown()
    assert await broker.jobs_queue_depth() == 0
    assert await dead_letters.get(no_ack=True, fail=False) is None
    assert await fake_calls(fake_provider, text) == []


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
    assert worker.store.claims[-1] == (sent.job_id, Claim("finished", "completed"))
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
    assert (row["status"], row["deliveries"], row["lease_until"]) == ("pending", 1, None)
    [abandoned] = await eventually(lambda: _cancelled_calls(fake_provider, text),
                                   what="the fake provider to see the call abandoned")
    assert not abandoned["finished"]
    assert await broker.jobs_queue_depth() == 1  # handed back, not lost or dead-lettered

    second = await start_worker(s)
    view = await finished(store, sent.job_id)
    assert view.status == "completed"
    assert view.body is not None and "echo: slow" in view.body
    row = await job_row(db, sent.job_id)
    assert (row["deliveries"], row["abandoned"], row["worker_id"]) == (
        2, 0, second.worker.worker_id)


async def test_a_job_whose_worker_died_is_taken_over_once_its_lease_runs_out(
    settings: Callable[..., Settings], store: Store, broker: Broker, db: asyncpg.Connection,
    start_worker: StartWorker, fake_provider: str,
) -> None:
    text = unique("orphaned by a crash")
    sent = await submit(store, broker, text, publish=False)
    # A worker claimed it and died: its lease runs, and the broker redelivers the message.
    await store.claim(sent.job_id, "dead-worker", 1.5)
    await broker.publish_job(sent)
    worker = await start_worker(settings(lease_s=2))
    view = await finished(store, sent.job_id)
    assert view.status == "completed"
    held = [c for job, c in worker.store.claims if job == sent.job_id and c.state == "held"]
    assert held and held[0].holder == "dead-worker"
    row = await job_row(db, sent.job_id)
    assert (row["abandoned"], row["worker_id"]) == (1, worker.worker.worker_id)
    assert len(await fake_calls(fake_provider, text)) == 1


async def test_a_duplicate_message_for_a_running_job_does_not_run_it_twice(
    settings: Callable[..., Settings], store: Store, broker: Broker, db: asyncpg.Connection,
    start_worker: StartWorker, fake_provider: str,
) -> None:
    text = unique("[[fake:delay=3]] once")
    s = settings(lease_s=2)
    sent = await submit(store, broker, text)
    first = await start_worker(s)
    await eventually(lambda: _claims_of(first, sent.job_id, count=1), what="the first claim")
    second = await start_worker(s)
    await broker.publish_job(sent)  # a duplicate, as the reconciler may publish
    view = await finished(store, sent.job_id)
    assert view.status == "completed"
    assert len(await fake_calls(fake_provider, text)) == 1
    states = [c.state for w in (first, second) for job, c in w.store.claims
              if job == sent.job_id]
    assert states.count("claimed") == 1
    assert (await job_row(db, sent.job_id))["abandoned"] == 0


class FlakyStore(ObservedStore):
    """The real store, but the database is away for the first `finish_jobs` calls."""

    outage = 3

    async def finish_jobs(self, items: list[tuple[uuid.UUID, Outcome]]
                          ) -> list[Finished | None | Exception]:
        if self.outage:
            self.outage -= 1
            raise StoreUnavailable()
        return await super().finish_jobs(items)


async def test_a_database_outage_holds_the_job_and_costs_no_attempt(
    settings: Callable[..., Settings], store: Store, broker: Broker, db: asyncpg.Connection,
    start_worker: StartWorker, fake_provider: str,
) -> None:
    text = unique("outage")
    sent = await submit(store, broker, text)
    worker = await start_worker(settings(), FlakyStore)
    view = await finished(store, sent.job_id)
    assert view.status == "completed"
    assert isinstance(worker.store, FlakyStore) and worker.store.outage == 0
    row = await job_row(db, sent.job_id)
    assert (row["attempts"], row["deliveries"]) == (1, 1)
    assert len(await fake_calls(fake_provider, text)) == 1


class FlakyBatchStore(ObservedStore):
    """The real store, recording how many jobs each finish took; the database is away for
    the first two batches of finishes."""

    outage = 2

    def __init__(self, pool: asyncpg.Pool) -> None:
        super().__init__(pool)
        self.finish_batches: list[int] = []

    async def finish_jobs(self, items: list[tuple[uuid.UUID, Outcome]]
                          ) -> list[Finished | None | Exception]:
        self.finish_batches.append(len(items))
        if self.outage:
            self.outage -= 1
            raise StoreUnavailable()
        return await super().finish_jobs(items)


async def test_concurrent_jobs_share_claims_and_finishes_and_an_outage_loses_none(
    settings: Callable[..., Settings], store: Store, broker: Broker, db: asyncpg.Connection,
    start_worker: StartWorker, fake_provider: str,
) -> None:
    texts = [unique(f"many {i}") for i in range(40)]
    sent = [await submit(store, broker, text) for text in texts]
    worker = await start_worker(settings(worker_concurrency=64), FlakyBatchStore)
    for envelope in sent:
        assert (await finished(store, envelope.job_id)).status == "completed"
    assert isinstance(worker.store, FlakyBatchStore) and worker.store.outage == 0
    # Coalesced: fewer statements than jobs, each job claimed once and run once.
    assert len(worker.store.claim_batches) < len(sent)
    assert max(worker.store.finish_batches) > 1
    assert sorted(job_id for job_id, c in worker.store.claims if c.state == "claimed") == (
        sorted(e.job_id for e in sent))
    rows = await db.fetch("SELECT attempts, deliveries, abandoned FROM jobs"
                          " WHERE id = ANY($1::uuid[])", [e.job_id for e in sent])
    assert {tuple(r) for r in rows} == {(1, 1, 0)}
    for text in texts:
        assert len(await fake_calls(fake_provider, text)) == 1


async def test_a_job_taken_over_too_often_fails_without_a_call(
    settings: Callable[..., Settings], store: Store, broker: Broker, db: asyncpg.Connection,
    start_worker: StartWorker, fake_provider: str,
) -> None:
    text = unique("poison")
    sent = await submit(store, broker, text)
    await db.execute("UPDATE jobs SET abandoned = 2 WHERE id = $1", sent.job_id)
    await store.claim(sent.job_id, "dead-worker", 0.5)  # a third worker dies under it
    await start_worker(settings(delivery_limit=3, lease_s=2))
    view = await finished(store, sent.job_id)
    assert (view.status, view.http_status) == ("failed", 500)
    assert view.body is not None
    assert "taken over from a worker that stopped under it 3 times" in view.body
    assert await fake_calls(fake_provider, text) == []


async def test_a_job_past_its_deadline_fails_with_a_timeout(
    settings: Callable[..., Settings], store: Store, broker: Broker,
    start_worker: StartWorker, fake_provider: str,
) -> None:
    text = unique("[[fake:delay=5]] too slow")
    sent = await submit(store, broker, text)
    await start_worker(settings(job_deadline_s=3, lease_s=1, provider_max_attempts=1))
    view = await finished(store, sent.job_id)
    assert (view.status, view.http_status) == ("failed", 504)
    assert view.body is not None
    assert orjson.loads(view.body)["error"] == {
        "type": "timeout_error",
        "message": "the job did not finish within 3 s (FERRY_JOB_DEADLINE)"}


# --- the reconciler --------------------------------------------------------------------------


async def test_the_reconciler_publishes_a_job_the_api_never_did(
    settings: Callable[..., Settings], store: Store, broker: Broker, db: asyncpg.Connection,
    start_worker: StartWorker, fake_provider: str,
) -> None:
    text = unique("committed, never published")
    sent = await submit(store, broker, text, publish=False)  # the api died after COMMIT
    await start_worker(settings())
    reconciler = Reconciler(settings(outbox_grace_s=0), store, broker)
    done = await reconciler.reconcile_once()
    assert done is not None and done["republished"] == 1
    view = await finished(store, sent.job_id)
    assert view.status == "completed"
    assert (await job_row(db, sent.job_id))["published_at"] is not None
    assert len(await fake_calls(fake_provider, text)) == 1


async def test_the_reconciler_republishes_a_job_whose_lease_ran_out(
    settings: Callable[..., Settings], store: Store, broker: Broker, db: asyncpg.Connection,
    start_worker: StartWorker, fake_provider: str,
) -> None:
    text = unique("lease ran out, message gone")
    sent = await submit(store, broker, text, publish=False)
    await store.claim(sent.job_id, "dead-worker", 0.1)  # and its message was acked and lost
    await db.execute("UPDATE jobs SET lease_until = now() - interval '1 minute'")
    await start_worker(settings())
    done = await Reconciler(settings(), store, broker).reconcile_once()
    assert done is not None and (done["expired_leases"], done["republished"]) == (1, 1)
    view = await finished(store, sent.job_id)
    assert view.status == "completed"
    assert (await job_row(db, sent.job_id))["abandoned"] == 1


async def test_a_dead_lettered_job_is_failed_with_a_reason(
    settings: Callable[..., Settings], store: Store, broker: Broker, db: asyncpg.Connection,
) -> None:
    sent = await submit(store, broker, unique("rejected"), publish=False)
    # The broker dead-letters a message (here: rejected by a consumer) ...
    connection = broker.link.connection
    assert connection is not None
    channel = await connection.channel()
    await broker.publish_job(sent)
    queue = await channel.get_queue(settings().jobs_queue)
    message = await eventually(lambda: queue.get(fail=False), what="the job message")
    await message.reject(requeue=False)
    # ... and the reconciler's drain fails its job, saying why.
    reconciler = Reconciler(settings(), store, broker)
    await broker.consume_dead_letters(reconciler.on_dead_letter)
    view = await finished(store, sent.job_id)
    assert (view.status, view.http_status) == ("failed", 500)
    assert view.body is not None
    assert orjson.loads(view.body)["error"]["message"] == (
        "the message broker gave up on the job (rejected); it was not completed")
    await channel.close()


async def _claims_of(worker: RunningWorker, job_id: uuid.UUID, count: int) -> bool:
    return sum(1 for claimed, _ in worker.store.claims if claimed == job_id) >= count


async def _cancelled_calls(base_url: str, text: str) -> list[dict[str, object]]:
    return [c for c in await fake_calls(base_url, text) if c["cancelled"]]
