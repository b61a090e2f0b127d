"""Webhooks end to end: endpoints added with `ferry webhooks`, jobs submitted with the SDK and
`x-bf-async-webhook`, a real receiver verifying each delivery with the `standardwebhooks`
package; retries with the same webhook-id, a worker killed while a delivery waits for its
retry, a hanging receiver next to jobs that keep completing."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import anthropic
import asyncpg
import orjson
import pytest
import pytest_asyncio

from tests.acceptance.jobs import MODEL, job_uuid, result, submit, unique, user
from tests.acceptance.stack import Stack, StackError, running_stack
from tests.acceptance.test_reporting import run_report
from tests.acceptance.webhook_receiver import HANG, Receiver, running_receiver
from tests.conftest import TestRun
from tests.support import eventually

pytestmark = pytest.mark.acceptance

HEADER = "x-bf-async-webhook"
ALICE = "sk-test-webhooks-alice"
BOB = "sk-test-webhooks-bob"


@pytest_asyncio.fixture(scope="module")
async def receiver() -> AsyncIterator[Receiver]:
    async with running_receiver() as receiver:
        yield receiver


@pytest_asyncio.fixture(scope="module")
async def ferry(test_run: TestRun, tmp_path_factory: pytest.TempPathFactory,
                receiver: Receiver) -> AsyncIterator[Stack]:
    # Retries 0.2 s, 0.4 s, 0.8 s apart; two webhook slots per worker; an attempt may hang
    # for 30 s (the hanging-receiver test releases its receiver itself).
    env = {"FERRY_AUTH": "keys", "FERRY_WEBHOOK_RETRY_BASE": "0.2",
           "FERRY_WEBHOOK_MAX_ATTEMPTS": "4", "FERRY_WEBHOOK_CONCURRENCY": "2",
           "FERRY_WEBHOOK_TIMEOUT": "30", "FERRY_WORKER_CONCURRENCY": "16"}
    async with running_stack(test_run, tmp_path_factory.mktemp("ferry-webhooks"), "webhooks",
                             workers=1, env=env) as stack:
        await stack.create_key("alice", "--secret", ALICE)
        await stack.create_key("bob", "--secret", BOB)
        yield stack


async def add(ferry: Stack, receiver: Receiver, *options: str) -> tuple[str, str]:
    """`ferry webhooks add` an endpoint of the receiver; (its name, its secret)."""
    name = unique("hook").replace(" ", "-")
    done = await ferry.ferry("webhooks", "add", name, receiver.url(name), *options)
    if done.returncode != 0:
        raise StackError(f"ferry webhooks add failed: {done.stderr}")
    return name, done.stdout.strip().splitlines()[-1]


async def fetch(database_url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


async def delivery(ferry: Stack, job_id: str) -> asyncpg.Record | None:
    rows = await fetch(ferry.database_url,
                       "SELECT * FROM webhook_deliveries WHERE job_id = $1", job_uuid(job_id))
    return rows[0] if rows else None


async def final_delivery(ferry: Stack, job_id: str) -> asyncpg.Record:
    async def probe() -> asyncpg.Record | None:
        row = await delivery(ferry, job_id)
        return row if row is not None and row["state"] != "pending" else None

    return await eventually(probe, timeout=60, what=f"the delivery of {job_id} to end")


async def attempts(ferry: Stack, delivery_id: Any) -> list[tuple[int, int | None]]:
    rows = await fetch(ferry.database_url, "SELECT attempt, status_code FROM webhook_attempts"
                       " WHERE delivery_id = $1 ORDER BY attempt", delivery_id)
    return [(r["attempt"], r["status_code"]) for r in rows]


def rfc3339(text: str) -> datetime:
    assert text.endswith("Z"), text
    return datetime.fromisoformat(text)


# --- what is sent ----------------------------------------------------------------------------


async def test_jobs_announce_their_end_signed_with_and_without_the_response(
        ferry: Stack, receiver: Receiver) -> None:
    slim, slim_secret = await add(ferry, receiver)
    full, full_secret = await add(ferry, receiver, "--include-response")
    texts = [unique(f"announce {i}") for i in range(6)]
    async with ferry.client(ALICE) as client:
        # Submitted at once, so several share a batch (one INSERT) on the api.
        jobs = await asyncio.gather(*(
            submit(client, text, {HEADER: slim if i % 2 else full})
            for i, text in enumerate(texts)))
        messages = [await result(client, job.id) for job in jobs]
    slim_got = {r.verify(slim_secret)["data"]["job_id"]: r
                for r in await receiver.wait_for(slim, 3)}
    full_got = {r.verify(full_secret)["data"]["job_id"]: r
                for r in await receiver.wait_for(full, 3)}
    assert set(slim_got) | set(full_got) == {job.id for job in jobs}
    for i, (job, message) in enumerate(zip(jobs, messages, strict=True)):
        got = slim_got[job.id] if i % 2 else full_got[job.id]
        body = orjson.loads(got.body)
        row = (await fetch(ferry.database_url, "SELECT j.*, r.body::text AS result FROM jobs j"
                           " JOIN job_results r ON r.job_id = j.id WHERE j.id = $1",
                           job_uuid(job.id)))[0]
        assert body["type"] == "async_job.completed"
        assert rfc3339(body["timestamp"]) == row["completed_at"]
        data = body["data"]
        assert {k: v for k, v in data.items() if k != "response"} == {
            "job_id": job.id, "status": "completed", "status_code": 200,
            "result_expires_at": data["result_expires_at"], "model": MODEL,
            "request_id": row["request_id"]}
        assert rfc3339(data["result_expires_at"]) == row["expires_at"]
        if i % 2:
            assert "response" not in data
        else:  # the stored result, byte for byte, as a poll answers it
            assert row["result"].encode() in got.body
            assert data["response"] == orjson.loads(row["result"])
            assert data["response"]["content"][0]["text"] == message.content[0].text
        assert got.headers["content-type"] == "application/json"
        assert got.headers["user-agent"].startswith("Ferry-Webhooks")
        assert got.id == "msg_" + (await delivery(ferry, job.id))["id"].hex  # type: ignore[index]
        assert abs(int(got.headers["webhook-timestamp"]) - got.at) < 5


async def test_a_failed_job_announces_its_status_and_error(
        ferry: Stack, receiver: Receiver) -> None:
    name, secret = await add(ferry, receiver, "--include-response")
    async with ferry.client(ALICE) as client:
        job = await submit(client, unique("[[fake:status=400]] refused"), {HEADER: name})
        with pytest.raises(anthropic.BadRequestError) as raised:
            await result(client, job.id)
    payload = (await receiver.wait_for(name, 1))[0].verify(secret)
    assert payload["type"] == "async_job.failed"
    assert {k: payload["data"][k] for k in ("job_id", "status", "status_code")} == {
        "job_id": job.id, "status": "failed", "status_code": 400}
    assert payload["data"]["response"] == raised.value.body


# --- retries -----------------------------------------------------------------------------------


async def test_a_receiver_answering_500_twice_gets_the_same_delivery_three_times(
        ferry: Stack, receiver: Receiver) -> None:
    name, secret = await add(ferry, receiver)
    receiver.script(name, 500, 500, 200)
    async with ferry.client(ALICE) as client:
        job = await submit(client, unique("retried"), {HEADER: name})
    got = await receiver.wait_for(name, 3)
    assert len({r.id for r in got}) == 1  # one webhook-id on every attempt
    assert len({r.body for r in got}) == 1  # the very same signed bytes
    for received in got:
        assert received.verify(secret)["data"]["job_id"] == job.id
    row = await final_delivery(ferry, job.id)
    assert (row["state"], row["attempts"], row["last_status"]) == ("delivered", 3, 200)
    assert await attempts(ferry, row["id"]) == [(1, 500), (2, 500), (3, 200)]
    assert row["payload"] is None  # dropped once delivered


async def test_a_refusing_receiver_fails_the_delivery_at_once_and_shows_in_the_list(
        ferry: Stack, receiver: Receiver) -> None:
    gone, _ = await add(ferry, receiver)
    down, _ = await add(ferry, receiver)
    receiver.script(gone, 410)
    receiver.script(down, 503, 503, 503, 503, 503)
    async with ferry.client(ALICE) as client:
        first = await submit(client, unique("gone"), {HEADER: gone})
        second = await submit(client, unique("down"), {HEADER: down})
    refused = await final_delivery(ferry, first.id)
    assert (refused["state"], refused["attempts"]) == ("failed", 1)
    assert refused["last_error"] == "receiver says 410"
    exhausted = await final_delivery(ferry, second.id)  # FERRY_WEBHOOK_MAX_ATTEMPTS=4
    assert (exhausted["state"], exhausted["attempts"]) == ("failed", 4)
    assert await attempts(ferry, exhausted["id"]) == [(n, 503) for n in range(1, 5)]
    listed = await ferry.ferry("webhooks", "list")
    lines = {line.split("\t")[0]: line for line in listed.stdout.splitlines()}
    assert "failed (HTTP 410)" in lines[gone] and "failed_24h=1" in lines[gone]
    assert "failed (HTTP 503)" in lines[down] and "pending=0" in lines[down]


async def test_a_delivery_waiting_for_its_retry_survives_a_killed_worker(
        ferry: Stack, receiver: Receiver) -> None:
    name, secret = await add(ferry, receiver)
    receiver.script(name, (503, {"retry-after": "3"}))  # then 200
    async with ferry.client(ALICE) as client:
        job = await submit(client, unique("survivor"), {HEADER: name})

        async def waiting() -> bool:
            row = await delivery(ferry, job.id)
            return row is not None and row["next_attempt_at"] is not None

        await eventually(waiting, what="the delivery to wait for its retry")
        ferry.kill(next(n for n, p in ferry.processes.items()
                        if n.startswith("worker") and p.poll() is None))
        ferry.start(f"worker-{unique('after-kill').split()[-1]}", "worker")
        got = await receiver.wait_for(name, 2)
    assert got[0].id == got[1].id and got[1].verify(secret)["data"]["job_id"] == job.id
    assert got[1].at - got[0].at >= 3  # the receiver's retry-after was honoured
    row = await final_delivery(ferry, job.id)
    assert (row["state"], row["attempts"]) == ("delivered", 2)


async def test_a_hanging_receiver_holds_webhook_slots_only(
        ferry: Stack, receiver: Receiver) -> None:
    name, _ = await add(ferry, receiver)
    receiver.script(name, HANG, HANG)
    async with ferry.client(ALICE) as client:
        stuck = await asyncio.gather(*(submit(client, unique(f"stuck {i}"), {HEADER: name})
                                       for i in range(3)))
        await receiver.wait_hanging(name, 2)  # both webhook slots of the worker are taken
        started = time.monotonic()
        jobs = await asyncio.gather(*(submit(client, unique(f"meanwhile {i}"))
                                      for i in range(20)))
        await asyncio.gather(*(result(client, job.id) for job in jobs))
        elapsed = time.monotonic() - started
        # Nothing about the stuck deliveries moved while the jobs completed.
        assert receiver.hanging[name] == 2 and len(receiver.requests[name]) == 2, elapsed
        receiver.release(name)
        for job in stuck:
            assert (await final_delivery(ferry, job.id))["state"] == "delivered"
    print(f"20 jobs completed in {elapsed:.2f} s while both webhook slots hung")


# --- who may name what ----------------------------------------------------------------------------


async def refusal(client: anthropic.AsyncAnthropic, headers: dict[str, str]) -> str:
    with pytest.raises(anthropic.BadRequestError) as raised:
        await client.messages.create(model=MODEL, max_tokens=8, messages=user(unique("no")),
                                     extra_headers=headers)
    body = raised.value.body
    assert isinstance(body, dict) and body["type"] == "error", body
    assert body["error"]["type"] == "invalid_request_error"
    return str(body["error"]["message"])


async def test_names_that_are_unknown_disabled_removed_or_another_keys_are_400(
        ferry: Stack, receiver: Receiver) -> None:
    bound, _ = await add(ferry, receiver, "--key", "alice")
    unknown = "x-bf-async-webhook: no enabled webhook endpoint named {!r} is available to " \
              "this caller"
    async with ferry.client(ALICE) as alice, ferry.client(BOB) as bob:
        assert await refusal(alice, {"x-bf-async": "true", HEADER: "nope"}) == \
            unknown.format("nope")
        assert await refusal(alice, {HEADER: bound}) == \
            "x-bf-async-webhook is for async jobs: send it with x-bf-async: true"
        # Bound to alice: bob is told exactly what an unknown name tells him.
        assert await refusal(bob, {"x-bf-async": "true", HEADER: bound}) == \
            unknown.format(bound)
        await submit(alice, unique("allowed"), {HEADER: bound})

        async def refused_after(*command: str) -> float:
            done = await ferry.ferry("webhooks", *command)
            assert done.returncode == 0, done.stderr
            changed = time.monotonic()

            async def refused() -> bool:
                try:
                    await submit(alice, unique("after a change"), {HEADER: bound})
                except anthropic.BadRequestError as exc:
                    return unknown.format(bound) in str(exc)
                return False

            await eventually(refused, interval=0.02, what=f"{command} to take effect")
            return time.monotonic() - changed

        disabled_in = await refused_after("disable", bound)
        done = await ferry.ferry("webhooks", "enable", bound)
        assert done.returncode == 0, done.stderr
        await submit(alice, unique("enabled again"), {HEADER: bound})
        removed_in = await refused_after("remove", bound)
    print(f"refused {disabled_in * 1000:.0f} ms after disable, {removed_in * 1000:.0f} ms "
          "after remove")


# --- the command line, rotation ---------------------------------------------------------------


async def test_cli_add_list_rotate_remove(ferry: Stack, receiver: Receiver) -> None:
    name, secret = await add(ferry, receiver)
    assert secret.startswith("whsec_") and len(base64.b64decode(secret[6:])) == 32
    again = await ferry.ferry("webhooks", "add", name, receiver.url(name))
    assert (again.returncode, again.stdout) == (1, "")
    assert again.stderr == f"ferry webhooks add: an endpoint named {name!r} exists already\n"
    for bad, why in (("ftp://x.example/", "http:// or https://"),
                     ("http://user:pw@x.example/", "no credentials")):
        refused = await ferry.ferry("webhooks", "add", unique("bad").replace(" ", "-"), bad)
        assert refused.returncode == 1 and why in refused.stderr
    listed = await ferry.ferry("webhooks", "list")
    line = next(x for x in listed.stdout.splitlines() if x.startswith(name + "\t"))
    assert line.split("\t")[1:4] == [receiver.url(name), "enabled", "keys=*"]
    assert "last=never" in line

    rotated = await ferry.ferry("webhooks", "rotate", name)
    assert rotated.returncode == 0, rotated.stderr
    new_secret = rotated.stdout.strip().splitlines()[-1]
    assert new_secret.startswith("whsec_") and new_secret != secret
    async with ferry.client(ALICE) as client:
        await submit(client, unique("rotated"), {HEADER: name})
    got = (await receiver.wait_for(name, 1))[0]
    assert len(got.headers["webhook-signature"].split(" ")) == 2  # new and previous
    assert got.verify(new_secret) == got.verify(secret)  # either secret verifies it

    removed = await ferry.ferry("webhooks", "remove", name)
    assert removed.returncode == 0, removed.stderr
    listed = await ferry.ferry("webhooks", "list")
    assert name not in listed.stdout
    missing = await ferry.ferry("webhooks", "rotate", name)
    assert missing.returncode == 1
    assert missing.stderr == f"ferry webhooks rotate: no webhook endpoint named {name!r}\n"


async def test_report_deliveries_and_failures_per_endpoint_per_day(
        ferry: Stack, receiver: Receiver) -> None:
    ok, _ = await add(ferry, receiver)
    bad, _ = await add(ferry, receiver)
    receiver.script(bad, 400)
    async with ferry.client(ALICE) as client:
        jobs = [await submit(client, unique("report"), {HEADER: ok}) for _ in range(2)]
        jobs.append(await submit(client, unique("report"), {HEADER: bad}))
    for job in jobs:
        await final_delivery(ferry, job.id)
    rows = {r["endpoint"]: r for r in await run_report(ferry.database_url,
                                                       "webhooks_per_endpoint_per_day")}
    assert (rows[ok]["deliveries"], rows[ok]["delivered"], rows[ok]["failed"]) == (2, 2, 0)
    assert (rows[bad]["deliveries"], rows[bad]["delivered"], rows[bad]["failed"]) == (1, 0, 1)
    assert rows[ok]["attempts"] == 2 and rows[bad]["attempts"] == 1

