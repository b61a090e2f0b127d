"""Ferry on a 3-node RabbitMQ cluster (quorum queues), with a node killed under load: the api's
node first, then, once it is back, a second one. Every job answered 200 completes, sync
requests recover within moments, and no Ferry process is restarted.

The cluster comes from the shared tool `rmq-cluster.sh` beside the project (nodes clA, clB,
clC on 5681-5683); it takes about half a minute to form.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from tests.acceptance.stack import PROJECT_ROOT, Stack
from tests.faults.conftest import Stacks
from tests.faults.faultkit import AsyncJobLoad, measure
from tests.faults.replies import Interactive, send_interactive
from tests.faults.services import run_command
from tests.faults.test_faults import (
    HANG_GUARD_S,
    STACK_ENV,
    acknowledged,
    assert_promises_held,
    live_pids,
    restarted,
)
from tests.support import eventually

pytestmark = [pytest.mark.acceptance, pytest.mark.faults]

SCRIPT = PROJECT_ROOT.parent / "shared" / "tools" / "rmq-cluster.sh"
NODES = {"clA": 5681, "clB": 5682, "clC": 5683}
RATE = 40.0  # async submits per second, beside a steady trickle of sync requests
CLUSTER_UP_S = 180.0


@dataclass
class Cluster:
    directory: Path

    @property
    def amqp_url(self) -> str:
        return ",".join(f"amqp://guest:guest@127.0.0.1:{port}/" for port in NODES.values())

    async def script(self, *args: str, timeout: float = CLUSTER_UP_S) -> str:  # noqa: ASYNC109
        return await run_command("env", f"RMQ_CLUSTER_DIR={self.directory}", "bash",
                                 str(SCRIPT), *args, timeout=timeout)

    async def kill(self, node: str) -> None:
        pid_file = self.directory / node / "mnesia" / f"{node}@localhost.pid"
        pid = int(pid_file.read_text().strip())
        os.kill(pid, 9)
        await eventually(lambda: _gone(pid), timeout=30, what=f"{node} to die")

    async def start(self, node: str) -> None:
        await self.script("start", node)

    async def queues(self, alive: str) -> str:
        """What the cluster says of its queues (for a failure's report)."""
        return await self.script("ctl", alive, "list_queues", "name", "type", "leader",
                                 "members", "messages", "consumers", timeout=60)


async def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest_asyncio.fixture(scope="session")
async def cluster() -> AsyncIterator[Cluster]:
    if not SCRIPT.exists():
        pytest.skip("the shared rmq-cluster.sh tool is not beside the project")
    # Not under pytest's own temporary directory: the nodes run as the rabbitmq user, who
    # must be able to reach it.
    directory = Path(tempfile.mkdtemp(prefix="ferry-rmq-cluster-"))
    directory.chmod(0o755)
    node = Cluster(directory / "nodes")
    try:
        await node.script("up")
        yield node
    finally:
        # Throwaway nodes: killed, not stopped (a graceful stop of three nodes takes over a
        # minute and a half here, and nothing of theirs is kept).
        for name in ("clA", "clB", "clC"):
            with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
                await node.kill(name)
        shutil.rmtree(directory, ignore_errors=True)


def connected_node(stack: Stack, name: str) -> str:
    """The node `name` is connected to now: its last `broker connected` log line."""
    ports = re.findall(r'"node": "amqp://guest:\*\*\*@127\.0\.0\.1:(\d+)/[^"]*", '
                       r'"link": "[^"]+", "reconnect": \w+, "event": "broker connected"',
                       stack.logs[name].read_text(errors="replace"))
    assert ports, f"{name} logged no connection"
    port = int(ports[-1])
    return next(node for node, p in NODES.items() if p == port)


@dataclass
class SyncTrickle:
    """Sync requests one after another for as long as it runs: when they failed, and when they
    succeeded again."""

    url: str
    answers: list[Interactive] = field(default_factory=list)

    async def run(self, stop: asyncio.Event) -> None:
        async with aiohttp.ClientSession() as http:
            while not stop.is_set():
                request = Interactive(f"cluster sync {uuid.uuid4().hex}", stream=False)
                self.answers.append(await send_interactive(http, self.url, request, timeout=30))
                await asyncio.sleep(0.05)

    def recovery_after(self, moment: float) -> float | None:
        """From `moment` to the first success of a request sent after it."""
        ok = [a.ended_at for a in self.answers
              if a.sent_at >= moment and a.status == 200 and a.ended_at is not None]
        return min(ok) - moment if ok else None

    async def recovered_since(self, moment: float) -> bool:
        return self.recovery_after(moment) is not None

    def unclean(self) -> list[Interactive]:
        return [a for a in self.answers
                if a.status != 200 and not a.ended_with_error(a.status or 0)]


async def test_a_node_loss_under_load(stacks: Stacks, cluster: Cluster) -> None:
    stack = await stacks.start("cluster", workers=2, sweeper=True, env=STACK_ENV,
                               amqp_url=cluster.amqp_url, throwaway_broker=True)
    before = live_pids(stack)
    trickle = SyncTrickle(stack.url)
    stop = asyncio.Event()
    trickling = asyncio.create_task(trickle.run(stop))
    kills: list[tuple[str, float]] = []
    try:
        async with AsyncJobLoad(stack.url, "cluster", rate=RATE) as load:
            await acknowledged(load, 100)
            for round_ in range(2):
                node = connected_node(stack, "api")
                killed_at = time.monotonic()
                await cluster.kill(node)
                kills.append((node, killed_at))
                try:
                    await load.until_acknowledged_after(killed_at, HANG_GUARD_S)
                    await eventually(partial(trickle.recovered_since, killed_at),
                                     timeout=HANG_GUARD_S,
                                     what="a sync request to succeed again")
                except AssertionError as exc:
                    alive = next(n for n in NODES if n != node)
                    raise AssertionError(f"{exc}\n{await cluster.queues(alive)}") from None
                if round_ == 0:
                    await cluster.start(node)  # back before the second node goes
            await load.run_for(3)
    finally:
        stop.set()
        await trickling
    outcome = await measure("RabbitMQ cluster node kill -9 (x2)", load, stack.url,
                            stack.fake_url, fault_end=kills[0][1], hang_guard_s=HANG_GUARD_S)
    recoveries = [trickle.recovery_after(at) for _, at in kills]
    print(f"FAULT cluster sync requests: requests={len(trickle.answers)}"
          f" ok={sum(a.status == 200 for a in trickle.answers)}"
          f" unclean={len(trickle.unclean())} killed={','.join(n for n, _ in kills)}"
          f" recovered_s={[round(r, 2) for r in recoveries if r is not None]}")
    broken = outcome.broken_promises() + restarted(stack, before)
    if trickle.unclean():
        broken.append(f"{len(trickle.unclean())} sync answers were not 200 nor an envelope: "
                      + "; ".join(a.describe() for a in trickle.unclean()[:5]))
    assert_promises_held(broken)
