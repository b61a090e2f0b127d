"""Fault injection: Ferry's promise, that a job whose id was returned always finishes, under
crashes and outages.

Each test puts a stack (fake provider, api, workers, sweeper) under a steady load of async
submits, breaks one thing, mends it, and then asserts that
  (a) every acknowledged job (HTTP 200) completed: the upstream stayed healthy throughout;
  (b) no job ran upstream more than twice;
  (c) every other answer was a 4xx/5xx in Anthropic's error envelope, never a hang;
  (d) Ferry recovered without any of its processes being restarted (except the one a test
      kills and restarts on purpose).
Each prints a one-line summary (`pytest -s` shows it). PostgreSQL and RabbitMQ outages run on
a private cluster and node (see conftest.py); the machine's own are never stopped.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import pytest

from tests.acceptance.stack import Stack
from tests.faults.conftest import Stacks
from tests.faults.faultkit import (
    AsyncJobLoad,
    Submit,
    is_error_envelope,
    measure,
    upstream_calls,
    upstream_in_flight,
)
from tests.faults.replies import Interactive, send_interactive
from tests.faults.services import (
    PrivatePostgres,
    PrivateRabbit,
    tcp_connections_of,
    tcp_ports_of,
)
from tests.support import eventually

pytestmark = [pytest.mark.acceptance, pytest.mark.faults]

# Settings of every stack here, to make recovery quick enough to watch. The durability rebuild
# reads the lease and reconcile settings (until then they are ignored): adjust them here.
STACK_ENV = {
    "FERRY_RETRY_BASE": "0.05",
    "FERRY_SWEEP_INTERVAL": "1",
    "FERRY_LEASE_SECONDS": "5",
    "FERRY_RECONCILE_INTERVAL": "1",
}
RATE = 100.0  # async submits per second: light, the two cores are shared
WARM_ACKS = 100  # acknowledged submits before the fault: the stack is busy when it hits
OUTAGE_S = 10.0  # PostgreSQL / RabbitMQ down
PAUSE_S = 3.0  # api under SIGSTOP
BURST = 64  # concurrent submits the api is killed / paused in the middle of
AFTER_S = 4.0  # load after the first acknowledgement that follows the fault
# How long after a fault's end acknowledged jobs may take to finish: a hang guard, generous on
# purpose; it is also how long a run against code that loses jobs waits for them.
HANG_GUARD_S = float(os.environ.get("FERRY_FAULT_HANG_GUARD", "120"))
# Interactive requests waiting on a broken reply channel must end well before this (their
# upstream call would take 60 s): a hang guard, not a speed assertion.
REPLY_HANG_GUARD_S = 20.0
SLOW = "[[fake:delay=60]]"


def one_in_ten_slow(n: int) -> str:
    """A directive per job: one in ten takes a second upstream, so outages find jobs
    mid-call."""
    return "[[fake:delay=1]]" if n % 10 == 0 else ""


STARTED_THEN_SLOW = "[[fake:chunks=8,stream_delay=30]]"


# --- helpers ---------------------------------------------------------------------------------


def live_pids(stack: Stack) -> dict[str, int]:
    return {name: proc.pid for name, proc in stack.processes.items() if proc.poll() is None}


def restarted(stack: Stack, before: dict[str, int], *,
              expected: Collection[str] = ()) -> list[str]:
    """Promise (d): the Ferry processes that died or were replaced, other than `expected`."""
    broken = []
    for name, pid in before.items():
        proc = stack.processes[name]
        if name in expected:
            if proc.poll() is not None:
                broken.append(f"{name}, restarted by the test, exited with {proc.returncode}")
        elif proc.pid != pid or proc.poll() is not None:
            broken.append(f"{name} did not survive the fault (exit code {proc.returncode})")
    return broken


async def acknowledged(load: AsyncJobLoad, n: int) -> None:
    await eventually(lambda: _true(len(load.acknowledged) >= n), timeout=60,
                     what=f"{n} acknowledged submits")


async def mid_burst(load: AsyncJobLoad, stack: Stack) -> str:
    """Fire BURST concurrent submits and return once the api is in the middle of storing them;
    says which moment was caught.

    The worst moment for today's submit path is a batch whose rows are inserted but not
    committed while broker confirms wait unread in the api's socket: the jobs queue then holds
    messages whose rows no worker can see yet. Up to 5 bursts, each twice the last, try to
    catch exactly that. A design that never shows it (an outbox commits before publishing) is
    caught instead at the first sign of the burst being stored: an open transaction or unread
    broker bytes, or (the last burst), since each look at /proc and pg_stat_activity takes long
    against those moments on a fast machine, part of the burst answered and part not."""
    api = stack.processes["api"].pid
    db_port = urlsplit(stack.database_url).port or 5432
    amqp_port = urlsplit(stack.broker_url).port or 5672
    conn = await asyncpg.connect(stack.database_url)
    try:
        async def moment(strict: bool) -> str | None:
            unread = any(c.unread for c in tcp_connections_of(api, amqp_port))
            if strict and not unread:
                return None
            in_transaction = bool(await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction'"
                " AND client_port = ANY($1::int[])", list(tcp_ports_of(api, db_port))))
            if unread and in_transaction:
                return "between confirm and commit"
            if not strict and (unread or in_transaction):
                return "while storing"
            return None

        async def caught(burst: list[Submit], strict: bool) -> str | None:
            if found := await moment(strict):
                return found
            answered = sum(1 for s in burst if s.answered_at)
            if answered == len(burst):
                return "missed"
            if not strict and answered:
                return f"mid-burst, {answered} of {len(burst)} submits answered"
            return None

        for attempt in range(6):
            # Each miss doubles the burst: on an idle machine the api stores 64 submits faster
            # than this loop can look; 2,048 take it a good part of a second.
            burst = load.burst(BURST * 2 ** attempt)
            found = await eventually(partial(caught, burst, attempt < 5), timeout=60,
                                     interval=0, what="the api to store the burst")
            if found != "missed":
                return found
        raise AssertionError(f"{attempt + 1} bursts, none caught while the api stored it")
    finally:
        await conn.close()


async def _true(value: bool) -> bool:
    return value


def assert_promises_held(broken: list[str]) -> None:
    assert not broken, "\n".join(broken)


# --- process faults (on the run's own PostgreSQL and RabbitMQ) --------------------------------


async def test_worker_kill_with_jobs_in_flight(stacks: Stacks) -> None:
    stack = await stacks.start("wkill", workers=2, sweeper=True, env=STACK_ENV)
    before = live_pids(stack)
    async with AsyncJobLoad(stack.url, "worker-kill", rate=40,
                            directive="[[fake:delay=2]]") as load:
        # Spread over both workers by the broker: worker-1 has its share of them.
        await eventually(lambda: _at_least(upstream_in_flight(stack.fake_url, "worker-kill"), 30),
                         timeout=60, what="30 jobs calling the slow upstream")
        stack.kill("worker-1")
        await load.run_for(2)  # worker-2 alone, while worker-1's jobs come back to the queue
        stack.start("worker-1", "worker")
        await stack.wait_consumers(["worker-1", "worker-2"])
        fault_end = time.monotonic()
        await load.until_acknowledged_after(fault_end, HANG_GUARD_S)
        await load.run_for(AFTER_S)
    outcome = await measure("worker kill -9", load, stack.url, stack.fake_url,
                            fault_end=fault_end, hang_guard_s=HANG_GUARD_S)
    assert outcome.duplicated, "the kill hit no job in flight: the test proved nothing"
    assert_promises_held(outcome.broken_promises()
                         + restarted(stack, before, expected={"worker-1"}))


async def _at_least(count: Awaitable[int], n: int) -> bool:
    return await count >= n


async def test_api_kill_during_a_burst(stacks: Stacks) -> None:
    stack = await stacks.start("akill", workers=2, sweeper=True, env=STACK_ENV)
    before = live_pids(stack)
    async with AsyncJobLoad(stack.url, "api-kill", rate=RATE) as load:
        await acknowledged(load, WARM_ACKS)
        moment = await mid_burst(load, stack)
        stack.kill("api")
        killed_at = time.monotonic()
        stack.start("api", "api")
        await stack.wait_ready("api", f"{stack.url}/readyz")
        fault_end = time.monotonic()
        await load.until_acknowledged_after(fault_end, HANG_GUARD_S)
        await load.run_for(AFTER_S)

    def dead_api(submit: Submit) -> bool:  # nobody was there to answer these
        return (submit.sent_at < fault_end and submit.answered_at is not None
                and submit.answered_at >= killed_at)

    outcome = await measure(f"api kill -9 mid-burst ({moment})", load, stack.url,
                            stack.fake_url, fault_end=fault_end, hang_guard_s=HANG_GUARD_S,
                            no_answer_expected=dead_api)
    assert_promises_held(outcome.broken_promises() + restarted(stack, before, expected={"api"}))


async def test_api_paused_during_a_burst(stacks: Stacks) -> None:
    stack = await stacks.start("apause", workers=2, sweeper=True, env=STACK_ENV)
    before = live_pids(stack)
    async with AsyncJobLoad(stack.url, "api-pause", rate=RATE) as load:
        await acknowledged(load, WARM_ACKS)
        moment = await mid_burst(load, stack)
        stack.pause("api")
        try:
            await asyncio.sleep(PAUSE_S)  # the fault's length
        finally:
            stack.resume("api")
        fault_end = time.monotonic()
        await load.until_acknowledged_after(fault_end, HANG_GUARD_S)
        await load.run_for(AFTER_S)
    outcome = await measure(f"api SIGSTOP {PAUSE_S:g}s mid-burst ({moment})", load,
                            stack.url, stack.fake_url, fault_end=fault_end,
                            hang_guard_s=HANG_GUARD_S)
    assert_promises_held(outcome.broken_promises() + restarted(stack, before))


# --- dependency outages (on a private PostgreSQL cluster / RabbitMQ node) ---------------------


async def test_postgres_stopped_under_load(stacks: Stacks,
                                           private_postgres: PrivatePostgres) -> None:
    stack = await stacks.start("pgstop", workers=2, sweeper=True, env=STACK_ENV,
                               database_server_url=private_postgres.url)
    before = live_pids(stack)
    async with AsyncJobLoad(stack.url, "pg-stop", rate=RATE, directive=one_in_ten_slow) as load:
        await acknowledged(load, WARM_ACKS)
        async with private_postgres.down():
            await asyncio.sleep(OUTAGE_S)  # the outage's length
        fault_end = time.monotonic()
        await load.until_acknowledged_after(fault_end, HANG_GUARD_S)
        await load.run_for(AFTER_S)
    outcome = await measure(f"PostgreSQL stopped {OUTAGE_S:g}s", load, stack.url,
                            stack.fake_url, fault_end=fault_end, hang_guard_s=HANG_GUARD_S)
    assert_promises_held(outcome.broken_promises() + restarted(stack, before))


async def test_rabbitmq_stopped_under_load(stacks: Stacks,
                                           private_rabbit: PrivateRabbit) -> None:
    stack = await stacks.start("rmqstop", workers=2, sweeper=True, env=STACK_ENV,
                               amqp_url=private_rabbit.url)
    before = live_pids(stack)
    async with AsyncJobLoad(stack.url, "rmq-stop", rate=RATE, directive=one_in_ten_slow) as load:
        await acknowledged(load, WARM_ACKS)
        async with private_rabbit.down():
            await asyncio.sleep(OUTAGE_S)  # the outage's length
        fault_end = time.monotonic()
        await load.until_acknowledged_after(fault_end, HANG_GUARD_S)
        await load.run_for(AFTER_S)
    outcome = await measure(f"RabbitMQ stopped {OUTAGE_S:g}s", load, stack.url,
                            stack.fake_url, fault_end=fault_end, hang_guard_s=HANG_GUARD_S)
    assert_promises_held(outcome.broken_promises() + restarted(stack, before))


# --- the reply channel: sync and stream requests waiting when it breaks ---------------------


@asynccontextmanager
async def interactive_in_flight(stack: Stack, label: str
                                ) -> AsyncIterator[dict[Interactive, asyncio.Task[Interactive]]]:
    """Sync and stream requests whose upstream call has begun and is slow: some before any
    output, some streams whose first events reached the client. Yields them once they are
    all in that state."""
    def text(kind: str, i: int, directive: str = SLOW) -> str:
        return f"{directive} fault {label} {kind} {i} {uuid.uuid4().hex}"

    requests = ([Interactive(text("sync", i), stream=False) for i in range(4)]
                + [Interactive(text("stream", i), stream=True) for i in range(2)]
                + [Interactive(text("started", i, STARTED_THEN_SLOW), stream=True)
                   for i in range(2)])
    async with aiohttp.ClientSession() as http:
        tasks = {r: asyncio.create_task(send_interactive(http, stack.url, r)) for r in requests}
        try:
            async def all_waiting() -> bool:
                calls = await upstream_calls(stack.fake_url)
                return all(calls[r.text] >= 1 and (r.started or not r.text.startswith(
                    STARTED_THEN_SLOW)) for r in requests)

            await eventually(all_waiting, timeout=60, what="every request to be in flight")
            assert not any(t.done() for t in tasks.values()), [r.describe() for r in tasks]
            yield tasks
        finally:
            for task in tasks.values():
                task.cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)


async def reply_loss(stack: Stack, label: str, break_channel: Callable[[], Awaitable[None]],
                     mend: Callable[[], Awaitable[None]]) -> list[str]:
    """Break the api's reply channel under waiting requests; what went wrong, if anything."""
    broken = []
    before = live_pids(stack)
    async with interactive_in_flight(stack, label) as tasks:
        broke_at = time.monotonic()
        try:
            await break_channel()
            await asyncio.wait(tasks.values(), timeout=REPLY_HANG_GUARD_S - (
                time.monotonic() - broke_at))
        finally:
            await mend()
        hung = [r for r, t in tasks.items() if not t.done()]
        if hung:  # how long they really wait, for the report
            await asyncio.wait(tasks.values(), timeout=HANG_GUARD_S)
            broken.append(f"{len(hung)} of {len(tasks)} requests were still waiting "
                          f"{REPLY_HANG_GUARD_S:g}s after the reply channel broke: " + "; ".join(
                              f"{r.describe()} after {_ended(r, broke_at)}" for r in hung))
        unclean = [r for r in tasks if r not in hung and not r.ended_with_error(503)]
        if unclean:
            broken.append("not a 503 error envelope (nor an error event in a begun stream): "
                          + "; ".join(r.describe() for r in unclean))
        answered = sorted(r.ended_at - broke_at for r in tasks if r.ended_at is not None)

    calls = await upstream_calls(stack.fake_url)
    if over := [r for r in tasks if calls[r.text] > 2]:
        broken.append(f"{len(over)} requests ran upstream more than twice")
    recovery = await recover_interactive(stack)
    broken += recovery.problems + restarted(stack, before)
    print(f"FAULT {label}: requests={len(tasks)} answered_in_guard={len(tasks) - len(hung)}"
          f" clean={len(tasks) - len(hung) - len(unclean)}"
          f" answered_after_s=[{', '.join(f'{t:.1f}' for t in answered)}]"
          f" recovered={recovery.seconds:.1f}s")
    return broken


def _ended(request: Interactive, since: float) -> str:
    return "never" if request.ended_at is None else f"{request.ended_at - since:.1f}s"


@dataclass
class Recovery:
    problems: list[str] = field(default_factory=list)  # broken promises seen while recovering
    seconds: float = 0.0  # until a sync request succeeded again


async def recover_interactive(stack: Stack) -> Recovery:
    """Until a sync request and an async job succeed again; every answer meanwhile must be a
    clean envelope."""
    recovery = Recovery()
    start = time.monotonic()
    async with aiohttp.ClientSession() as http:
        async def sync_ok() -> bool:
            request = await send_interactive(http, stack.url, Interactive(
                f"fault recovery {uuid.uuid4().hex}", stream=False), timeout=30)
            if request.status != 200 and not is_error_envelope(request.body):
                recovery.problems.append(f"while recovering: {request.describe()}")
            return request.status == 200

        await eventually(sync_ok, timeout=HANG_GUARD_S, interval=0.5,
                         what="a sync request to succeed again")
    recovery.seconds = time.monotonic() - start
    async with AsyncJobLoad(stack.url, "after-reply-loss", rate=10) as load:
        await acknowledged(load, 5)
    outcome = await measure("async jobs after the reply channel broke", load, stack.url,
                            stack.fake_url, fault_end=start, hang_guard_s=HANG_GUARD_S)
    recovery.problems += outcome.broken_promises()
    return recovery


async def test_reply_channel_closed_by_the_broker(stacks: Stacks,
                                                  private_rabbit: PrivateRabbit) -> None:
    stack = await stacks.start("replyclose", workers=2, sweeper=True, env=STACK_ENV,
                               amqp_url=private_rabbit.url)

    async def close_api_connection() -> None:
        ports = tcp_ports_of(stack.processes["api"].pid, private_rabbit.port)
        closed = await private_rabbit.close_connections_from(ports, "fault test")
        assert closed, f"no connection of the api found on the broker (api ports {ports})"

    async def nothing() -> None:
        pass

    assert_promises_held(await reply_loss(stack, "api broker connection closed",
                                          close_api_connection, nothing))


async def test_broker_stopped_with_sync_requests_waiting(stacks: Stacks,
                                                        private_rabbit: PrivateRabbit) -> None:
    stack = await stacks.start("replystop", workers=2, sweeper=True, env=STACK_ENV,
                               amqp_url=private_rabbit.url)
    assert_promises_held(await reply_loss(stack, "broker stopped under waiting requests",
                                          private_rabbit.stop, private_rabbit.start))
