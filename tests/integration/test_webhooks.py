"""Webhooks against the real PostgreSQL and RabbitMQ: the delivery is written with the job's
end, the reconciler publishes what a worker did not, a delivered row is never sent again, the
claim lets one worker send at a time, and the api's copy of the endpoints costs no query per
submit yet follows every change."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime

import asyncpg
import orjson
import pytest
import pytest_asyncio

from api.auth import Principal
from api.webhooks import WebhookDirectory
from shared.broker import Broker
from shared.errors import InvalidRequest
from shared.jobs import JobEnvelope, format_job_id, new_job_id
from shared.keys import KeyRecord, Limits
from shared.settings import Settings
from shared.store import Finished, NewJob, Outcome, Store
from shared.webhooks import new_secret
from shared.webhookstore import Listing, WebhookStore
from tests.acceptance.webhook_receiver import Receiver, running_receiver
from tests.integration.conftest import CALLER, RunningWorker, finished
from tests.support import MODEL, eventually, request_body
from worker.reconciler import Reconciler

pytestmark = pytest.mark.integration

RESULT = b'{"id":"msg_1","type":"message","content":[{"type":"text","text":"hi"}]}'


@pytest_asyncio.fixture
async def hooks(store: Store) -> WebhookStore:
    return WebhookStore(store)


@pytest_asyncio.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with running_receiver() as receiver:
        yield receiver


StartWorker = Callable[[Settings], Awaitable[RunningWorker]]


async def new_job(store: Store, endpoint: uuid.UUID | None) -> uuid.UUID:
    job_id = new_job_id()
    message = JobEnvelope(job_id=job_id, model=MODEL, body=request_body("x")).encode()
    job = NewJob(job_id, CALLER, "async", MODEL, "anthropic", 60, message,
                 request_id="req_test", webhook_endpoint_id=endpoint)
    assert await store.insert_jobs([job]) == [None]
    return job_id


def completed() -> Outcome:
    return Outcome(status="completed", body=RESULT, attempts=1)


async def test_the_delivery_is_written_with_the_jobs_end(
        store: Store, hooks: WebhookStore, db: asyncpg.Connection) -> None:
    endpoint = await hooks.add("orders", "http://127.0.0.1:9/h", new_secret(), True, [])
    job_id = await new_job(store, endpoint.id)
    finished_job = await store.finish_job(job_id, completed())
    assert finished_job is not None and finished_job.delivery_id is not None
    row = await db.fetchrow("SELECT * FROM webhook_deliveries WHERE job_id = $1", job_id)
    job = await db.fetchrow("SELECT completed_at FROM jobs WHERE id = $1", job_id)
    assert (row["id"], row["endpoint_id"], row["state"], row["event_type"]) == (
        finished_job.delivery_id, endpoint.id, "pending", "async_job.completed")
    assert (row["attempts"], row["published_at"], row["created_at"]) == (
        0, None, job["completed_at"])
    payload = orjson.loads(row["payload"])
    assert payload["data"]["job_id"] == format_job_id(job_id)
    assert payload["data"]["request_id"] == "req_test"
    assert RESULT in bytes(row["payload"])
    # Finishing again changes nothing: one delivery per job.
    assert await store.finish_job(job_id, completed()) is None
    assert await db.fetchval("SELECT count(*) FROM webhook_deliveries") == 1


async def test_a_job_without_an_endpoint_has_no_delivery(
        store: Store, db: asyncpg.Connection) -> None:
    job_id = await new_job(store, None)
    finished_job = await store.finish_job(job_id, completed())
    assert finished_job is not None and finished_job.delivery_id is None
    assert await db.fetchval("SELECT count(*) FROM webhook_deliveries") == 0
    assert await store.finish(await new_job(store, None), completed()) is True


async def test_a_batch_of_finishes_writes_deliveries_only_for_jobs_with_an_endpoint(
        store: Store, hooks: WebhookStore, db: asyncpg.Connection) -> None:
    endpoint = await hooks.add("mixed", "http://127.0.0.1:9/h", new_secret(), True, [])
    plain = [await new_job(store, None) for _ in range(3)]
    hooked = [await new_job(store, endpoint.id) for _ in range(2)]
    ids = [plain[0], hooked[0], plain[1], hooked[1], plain[2]]
    results = await store.finish_jobs([(job_id, completed()) for job_id in ids])
    assert all(isinstance(r, Finished) for r in results)
    delivered = [r.delivery_id if isinstance(r, Finished) else None for r in results]
    assert delivered[0] is delivered[2] is delivered[4] is None
    rows = await db.fetch("SELECT id, job_id, state FROM webhook_deliveries")
    assert {(r["id"], r["job_id"], r["state"]) for r in rows} == {
        (delivered[1], hooked[0], "pending"), (delivered[3], hooked[1], "pending")}
    assert await db.fetchval("SELECT count(*) FROM job_results WHERE job_id = ANY($1)",
                             ids) == 5
    assert await db.fetchval("SELECT count(*) FROM job_payloads") == 0


async def test_an_endpoint_disabled_before_the_job_ended_gets_a_failed_delivery(
        store: Store, hooks: WebhookStore, db: asyncpg.Connection) -> None:
    endpoint = await hooks.add("paused", "http://127.0.0.1:9/h", new_secret(), False, [])
    job_id = await new_job(store, endpoint.id)
    await hooks.set_enabled("paused", False)
    finished_job = await store.finish_job(job_id, completed())
    assert finished_job is not None and finished_job.delivery_id is None  # nothing to send
    row = await db.fetchrow("SELECT * FROM webhook_deliveries WHERE job_id = $1", job_id)
    assert (row["state"], row["payload"], row["last_error"]) == (
        "failed", None, "the endpoint was disabled or removed before the job ended")
    assert (await hooks.report())[0].failed_24h == 1


async def test_one_worker_at_a_time_sends_a_delivery(
        store: Store, hooks: WebhookStore, db: asyncpg.Connection) -> None:
    endpoint = await hooks.add("claims", "http://127.0.0.1:9/h", new_secret(), False, [])
    finished_job = await store.finish_job(await new_job(store, endpoint.id), completed())
    assert finished_job is not None and finished_job.delivery_id is not None
    delivery = finished_job.delivery_id
    first = await hooks.claim(delivery, "w1", 30)
    assert (first.state, first.attempt, first.url) == ("claimed", 1, "http://127.0.0.1:9/h")
    held = await hooks.claim(delivery, "w2", 30)
    assert held.state == "held" and 29 < held.remaining_s <= 30
    assert await hooks.record(delivery, 1, duration_ms=5, status_code=503, error="busy",
                              state="pending", retry_in_s=20)
    early = await hooks.claim(delivery, "w2", 30)
    assert early.state == "early" and 19 < early.remaining_s <= 20
    await db.execute("UPDATE webhook_deliveries SET next_attempt_at = now()")
    second = await hooks.claim(delivery, "w2", 30)
    assert (second.state, second.attempt) == ("claimed", 2)
    # w2 stalls past its lease; w3 takes the delivery over. w2's late answer is kept with its
    # attempt, but the delivery is w3's.
    await db.execute("UPDATE webhook_deliveries SET lease_until = now() - interval '1 s'")
    third = await hooks.claim(delivery, "w3", 30)
    assert (third.state, third.attempt) == ("claimed", 3)
    assert not await hooks.record(delivery, 2, duration_ms=7, status_code=500, error="late",
                                  state="pending", retry_in_s=1)
    assert await hooks.record(delivery, 3, duration_ms=4, status_code=200, error=None,
                              state="delivered")
    assert (await hooks.claim(delivery, "w4", 30)).state == "final"
    rows = await db.fetch("SELECT attempt, worker_id, duration_ms, status_code, error"
                          " FROM webhook_attempts ORDER BY attempt")
    assert [tuple(r) for r in rows] == [
        (1, "w1", 5, 503, "busy"), (2, "w2", 7, 500, "late"), (3, "w3", 4, 200, None)]
    row = await db.fetchrow("SELECT * FROM webhook_deliveries")
    assert (row["state"], row["attempts"], row["last_status"], row["payload"]) == (
        "delivered", 3, 200, None)


async def test_the_reconciler_publishes_deliveries_no_worker_did(
        settings: Callable[..., Settings], store: Store, broker: Broker, hooks: WebhookStore,
        db: asyncpg.Connection) -> None:
    endpoint = await hooks.add("outbox", "http://127.0.0.1:9/h", new_secret(), False, [])
    # A worker finished the job and stopped before publishing the delivery ...
    finished_job = await store.finish_job(await new_job(store, endpoint.id), completed())
    assert finished_job is not None and finished_job.delivery_id is not None
    # ... and another delivery's delayed message never came back from its tier.
    overdue = await store.finish_job(await new_job(store, endpoint.id), completed())
    assert overdue is not None and overdue.delivery_id is not None
    await db.execute("UPDATE webhook_deliveries SET published_at = now(), attempts = 1,"
                     " next_attempt_at = now() - interval '10 minutes' WHERE id = $1",
                     overdue.delivery_id)
    done = await Reconciler(settings(outbox_grace_s=0), store, broker).reconcile_once()
    assert done is not None and done["webhooks_republished"] == 2
    connection = broker.link.connection
    assert connection is not None
    channel = await connection.channel()
    queue = await channel.get_queue(settings().webhooks_queue)
    ids = set()
    for _ in range(2):
        message = await eventually(lambda: queue.get(fail=False), what="a delivery message")
        ids.add(uuid.UUID(hex=message.message_id))
        await message.ack()
    assert ids == {finished_job.delivery_id, overdue.delivery_id}
    assert await db.fetchval("SELECT count(*) FROM webhook_deliveries"
                             " WHERE published_at IS NOT NULL AND next_attempt_at IS NULL") == 2
    await channel.close()


async def test_a_dead_lettered_delivery_is_failed_with_a_reason(
        settings: Callable[..., Settings], store: Store, broker: Broker, hooks: WebhookStore,
        db: asyncpg.Connection) -> None:
    endpoint = await hooks.add("dead", "http://127.0.0.1:9/h", new_secret(), False, [])
    finished_job = await store.finish_job(await new_job(store, endpoint.id), completed())
    assert finished_job is not None and finished_job.delivery_id is not None
    await broker.publish_webhook(finished_job.delivery_id)
    connection = broker.link.connection
    assert connection is not None
    channel = await connection.channel()
    queue = await channel.get_queue(settings().webhooks_queue)
    message = await eventually(lambda: queue.get(fail=False), what="the delivery message")
    await message.reject(requeue=False)  # the broker dead-letters it
    reconciler = Reconciler(settings(), store, broker)
    await broker.consume_webhook_dead_letters(reconciler.on_webhook_dead_letter)

    async def failed() -> str | None:
        return await db.fetchval("SELECT last_error FROM webhook_deliveries"
                                 " WHERE state = 'failed'")

    assert await eventually(failed, what="the delivery to fail") == (
        "the message broker gave up on the delivery (rejected)")
    await channel.close()


async def test_a_delivered_webhook_is_not_sent_again_when_its_message_comes_back(
        settings: Callable[..., Settings], store: Store, broker: Broker, hooks: WebhookStore,
        start_worker: StartWorker, receiver: Receiver, db: asyncpg.Connection) -> None:
    name = "once"
    endpoint = await hooks.add(name, receiver.url(name), new_secret(), False, [])
    finished_job = await store.finish_job(await new_job(store, endpoint.id), completed())
    assert finished_job is not None and finished_job.delivery_id is not None
    await start_worker(settings(lanes="webhooks"))
    await broker.publish_webhook(finished_job.delivery_id)
    await receiver.wait_for(name, 1)

    async def delivered() -> bool:
        return await db.fetchval("SELECT state FROM webhook_deliveries") == "delivered"

    await eventually(delivered, what="the delivery to be recorded")
    for _ in range(3):  # what a redelivery or the reconciler's duplicate would bring
        await broker.publish_webhook(finished_job.delivery_id)
    # A job with its own webhook, published after the duplicates, arrives after they were
    # handled (one queue, one consumer): then they have been dropped, not sent.
    marker = await store.finish_job(await new_job(store, endpoint.id), completed())
    assert marker is not None and marker.delivery_id is not None
    await broker.publish_webhook(marker.delivery_id)
    got = await receiver.wait_for(name, 2)
    assert [r.id for r in got] == [f"msg_{finished_job.delivery_id.hex}",
                                   f"msg_{marker.delivery_id.hex}"]
    assert await db.fetchval("SELECT max(attempts) FROM webhook_deliveries") == 1


async def test_a_job_run_by_a_worker_announces_itself(
        settings: Callable[..., Settings], store: Store, broker: Broker, hooks: WebhookStore,
        start_worker: StartWorker, receiver: Receiver) -> None:
    """The whole path in process: submit, worker runs the job, publishes the delivery after
    the commit, its webhook lane sends it."""
    endpoint = await hooks.add("inproc", receiver.url("inproc"), new_secret(), False, [])
    job_id = await new_job(store, endpoint.id)
    await start_worker(settings())
    [stored] = await store.messages([job_id])
    await broker.publish_raw_job(job_id, stored.message)
    await finished(store, job_id)
    got = await receiver.wait_for("inproc", 1)
    assert orjson.loads(got[0].body)["data"]["job_id"] == format_job_id(job_id)


# --- the api's copy of the endpoints --------------------------------------------------------------


class CountingHooks(WebhookStore):
    def __init__(self, store: Store) -> None:
        super().__init__(store)
        self.loads = 0

    async def listings(self) -> dict[str, Listing]:
        self.loads += 1
        return await super().listings()


def principal(key_id: uuid.UUID | None) -> Principal:
    if key_id is None:
        return Principal(b"anon")
    key = KeyRecord(key_id, "k", "p", datetime.now(UTC), limits=Limits())
    return Principal(b"owner", key)


async def test_the_api_resolves_names_without_a_query_and_follows_changes(
        store: Store, settings: Callable[..., Settings]) -> None:
    counting = CountingHooks(store)
    directory = WebhookDirectory(counting, settings().database_url)
    async with directory.running():
        endpoint = await counting.add("orders", "http://127.0.0.1:9/h", new_secret(), False, [])
        # Added a moment ago: a name not in the copy reloads it.
        assert await directory.resolve("orders", principal(None)) == endpoint.id
        loads = counting.loads
        for _ in range(200):
            assert await directory.resolve("orders", principal(None)) == endpoint.id
        # No query per submit. The add's own notification may land after the reload above
        # and ask for one more (the copy cannot tell it from a later change).
        assert counting.loads <= loads + 1
        with pytest.raises(InvalidRequest):
            await directory.resolve("nope", principal(None))
        await counting.remove("orders")  # NOTIFY: the next lookup reloads

        async def refused() -> bool:
            try:
                await directory.resolve("orders", principal(None))
            except InvalidRequest:
                return True
            return False

        await eventually(refused, interval=0.01, what="the removal to reach the api")


async def test_an_endpoint_bound_to_keys_is_only_theirs(
        store: Store, settings: Callable[..., Settings], db: asyncpg.Connection) -> None:
    keys = {}
    for name in ("alice", "bob"):
        keys[name] = uuid.uuid4()
        await db.execute("INSERT INTO api_keys (id, name, prefix, secret_hash)"
                         " VALUES ($1, $2, 'p', $3)", keys[name], name, name.encode())
    hooks = WebhookStore(store)
    endpoint = await hooks.add("alices", "http://127.0.0.1:9/h", new_secret(), False,
                               ["alice"])
    assert endpoint.keys == ("alice",)
    with pytest.raises(ValueError, match="no key named 'carol'"):
        await hooks.add("carols", "http://127.0.0.1:9/h", new_secret(), False, ["carol"])
    directory = WebhookDirectory(hooks, settings().database_url)
    async with directory.running():
        assert await directory.resolve("alices", principal(keys["alice"])) == endpoint.id
        messages = set()
        for who in (principal(keys["bob"]), principal(None)):
            with pytest.raises(InvalidRequest) as refused:
                await directory.resolve("alices", who)
            messages.add(refused.value.message.replace("alices", "X"))
        with pytest.raises(InvalidRequest) as unknown:
            await directory.resolve("nobody", principal(keys["bob"]))
        messages.add(unknown.value.message.replace("nobody", "X"))
        assert len(messages) == 1  # bob cannot tell alice's endpoint from no endpoint


async def test_concurrent_lookups_share_one_reload(
        store: Store, settings: Callable[..., Settings]) -> None:
    counting = CountingHooks(store)
    await counting.add("shared", "http://127.0.0.1:9/h", new_secret(), False, [])
    directory = WebhookDirectory(counting, settings().database_url)
    results = await asyncio.gather(*(directory.resolve("shared", principal(None))
                                     for _ in range(50)))
    assert len(set(results)) == 1 and counting.loads == 1
