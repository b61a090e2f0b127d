"""Ferry's real processes (`python -m shared.cli ...`), started for acceptance tests.

Every process logs to a file; the files are attached to the report of a failing test and shown
when the stack does not come up. Processes are always terminated on the way out.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import anthropic

from tests.conftest import TestRun, connect_any
from tests.support import free_port

PROJECT_ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 30.0
RUN_TIMEOUT_S = 60.0  # for a process expected to exit (`ferry migrate`)
LOG_TAIL_CHARS = 6000


class StackError(AssertionError):
    pass


@dataclass
class Stack:
    run: TestRun
    log_dir: Path
    namespace: str
    database_url: str
    settings_env: dict[str, str] = field(default_factory=dict)  # FERRY_* for this stack
    amqp_url: str | None = None  # a broker of the stack's own; None: the run's
    port: int = field(default_factory=free_port)
    fake_port: int = field(default_factory=free_port)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)
    _files: list[IO[bytes]] = field(default_factory=list)

    def __repr__(self) -> str:
        return f"Stack({self.namespace}, api {self.url}, logs in {self.log_dir})"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def fake_url(self) -> str:
        return f"http://127.0.0.1:{self.fake_port}"

    @property
    def broker_url(self) -> str:
        return self.amqp_url or self.run.amqp_url

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of every Ferry process of this stack."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("FERRY_", "ANTHROPIC_", "OPENAI_"))
               and k not in ("DATABASE_URL", "AMQP_URL")}
        env.update(
            DATABASE_URL=self.database_url,
            AMQP_URL=self.broker_url,
            FERRY_NAMESPACE=self.namespace,
            FERRY_HOST="127.0.0.1",
            FERRY_PORT=str(self.port),
            ANTHROPIC_BASE_URL=self.fake_url,
            ANTHROPIC_API_KEY="sk-fake-upstream",
            FERRY_RETRY_BASE="0.05",
            FERRY_SHUTDOWN_GRACE="2",
            FERRY_LOG_FORMAT="json",
            # Most tests are about other things than gateway keys: any credential is a caller.
            # Tests of keys (and of real clients) set FERRY_AUTH=keys.
            FERRY_AUTH="off",
            PYTHONUNBUFFERED="1",
        )
        env.update(self.settings_env)
        env.update(extra)
        return env

    def start(self, name: str, *args: str, env: dict[str, str] | None = None
              ) -> subprocess.Popen[bytes]:
        """`ferry <args>` as a process called `name`, logging to `<log_dir>/<name>.log`."""
        assert name not in self.processes or self.processes[name].poll() is not None, name
        path = self.log_dir / f"{name}.log"
        log = path.open("ab")
        self._files.append(log)
        env = dict(env or self.env())
        # Workers and sweepers serve /metrics on a port of their own: one each.
        env.setdefault("FERRY_METRICS_PORT", str(free_port()))
        proc = subprocess.Popen(
            [sys.executable, "-m", "shared.cli", *args], cwd=PROJECT_ROOT,
            env=env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        self.processes[name] = proc
        self.logs[name] = path
        return proc

    def kill(self, name: str) -> None:
        """SIGKILL: no shutdown code runs, as when a machine dies."""
        proc = self.processes[name]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    def pause(self, name: str) -> None:
        """SIGSTOP: the process stays, its sockets stay open, nothing in it runs."""
        self.processes[name].send_signal(signal.SIGSTOP)

    def resume(self, name: str) -> None:
        """SIGCONT after `pause`."""
        self.processes[name].send_signal(signal.SIGCONT)

    def stop(self, name: str, timeout: float = 10.0) -> int:
        proc = self.processes[name]
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        return proc.returncode

    def stop_all(self) -> None:
        running = [p for p in self.processes.values() if p.poll() is None]
        for proc in running:
            proc.send_signal(signal.SIGCONT)  # a paused process would not see SIGTERM
            proc.terminate()
        deadline = time.monotonic() + 10
        for proc in running:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        for log in self._files:
            log.close()

    def log_text(self, name: str) -> str:
        text = self.logs[name].read_text(errors="replace")
        return text if len(text) <= LOG_TAIL_CHARS else "...\n" + text[-LOG_TAIL_CHARS:]

    def report(self) -> list[tuple[str, str]]:
        """(title, log tail) per process, for a failure report."""
        out = []
        for name, proc in self.processes.items():
            state = "running" if proc.poll() is None else f"exit code {proc.returncode}"
            out.append((f"ferry {name} ({state}) {self.logs[name]}", self.log_text(name)))
        return out

    def describe(self) -> str:
        return "\n".join(f"----- {title} -----\n{text}" for title, text in self.report())

    async def wait_ready(self, name: str, url: str) -> None:
        """Until `url` answers 200; fails with every log if `name` exits or time runs out."""
        proc = self.processes[name]
        deadline = time.monotonic() + READY_TIMEOUT_S
        last = "no answer"
        async with aiohttp.ClientSession() as http:
            while True:
                if proc.poll() is not None:
                    raise StackError(f"{name} exited with {proc.returncode} before it was "
                                     f"ready\n{self.describe()}")
                try:
                    async with http.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                        if resp.status == 200:
                            return
                        last = f"HTTP {resp.status}: {await resp.text()}"
                except (TimeoutError, aiohttp.ClientError) as exc:
                    last = repr(exc)
                if time.monotonic() > deadline:
                    raise StackError(f"{name} not ready at {url} after {READY_TIMEOUT_S}s "
                                     f"({last})\n{self.describe()}")
                await asyncio.sleep(0.1)

    async def wait_consumers(self, names: list[str]) -> None:
        """Until the jobs queue has a consumer per worker in `names` (they have no /readyz)."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        connection = await connect_any(self.broker_url)
        try:
            channel = await connection.channel()
            while True:
                for name in names:
                    if self.processes[name].poll() is not None:
                        raise StackError(f"{name} exited with {self.processes[name].returncode}"
                                         f"\n{self.describe()}")
                queue = await channel.declare_queue(f"{self.namespace}.jobs", passive=True)
                consumers = queue.declaration_result.consumer_count or 0
                if consumers >= len(names):
                    return
                if time.monotonic() > deadline:
                    raise StackError(f"{consumers} of {len(names)} workers consuming after "
                                     f"{READY_TIMEOUT_S}s\n{self.describe()}")
                await asyncio.sleep(0.1)
        finally:
            await connection.close()

    async def run_to_completion(self, name: str, *args: str) -> None:
        proc = self.start(name, *args)
        try:
            code = await asyncio.to_thread(proc.wait, RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise StackError(f"{name} did not finish in {RUN_TIMEOUT_S}s\n{self.describe()}"
                             ) from None
        if code != 0:
            raise StackError(f"{name} exited with {code}\n{self.describe()}")

    async def ferry(self, *args: str, env: dict[str, str] | None = None
                    ) -> subprocess.CompletedProcess[str]:
        """`ferry <args>` with this stack's environment, its output captured (`ferry keys`)."""
        return await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "shared.cli", *args], cwd=PROJECT_ROOT,
            env=env or self.env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
            check=False, stdin=subprocess.DEVNULL)

    async def create_key(self, name: str, *options: str) -> str:
        """`ferry keys create NAME OPTIONS`; returns the secret (its output's last line)."""
        done = await self.ferry("keys", "create", name, *options)
        if done.returncode != 0:
            raise StackError(f"ferry keys create {name} failed: {done.stderr}")
        return done.stdout.strip().splitlines()[-1]

    def client(self, api_key: str = "client-key-a") -> anthropic.AsyncAnthropic:
        return anthropic.AsyncAnthropic(base_url=f"{self.url}/anthropic", api_key=api_key,
                                        max_retries=0)


@asynccontextmanager
async def running_stack(run: TestRun, log_dir: Path, suffix: str, *, workers: int = 2,
                        env: dict[str, str] | None = None,
                        before_start: Callable[[Stack], object] | None = None,
                        amqp_url: str | None = None,
                        database_server_url: str | None = None,
                        sweeper: bool = False,
                        throwaway_broker: bool = False,
                        ) -> AsyncIterator[Stack]:
    """The fake provider, `ferry migrate` on a new database, the api and `workers` workers;
    `env` adds settings (FERRY_...) for every process; `before_start(stack)` runs once the
    ports are chosen and before any process starts (to write a file naming them, say).

    `amqp_url` and `database_server_url` put the stack on a broker and a PostgreSQL server of
    its own (a private one a fault test may stop) instead of the run's; its queues and its
    database are removed there (its queues are not when `throwaway_broker`: a broker the test
destroys anyway, where deleting quorum queues with a member down would only wait). `sweeper`
also starts `ferry sweeper`."""
    server_url = database_server_url or run.server_url
    database_url = _with_database(server_url, run.new_database_name())  # made by `ferry migrate`
    stack = Stack(run, log_dir, run.new_namespace(suffix), database_url,
                  dict(env or {}), amqp_url=amqp_url)
    if before_start is not None:
        before_start(stack)
    try:
        stack.start("fake-provider", "fake-provider", "--port", str(stack.fake_port))
        await stack.run_to_completion("migrate", "migrate")
        stack.start("api", "api")
        names = [f"worker-{i}" for i in range(1, workers + 1)]
        for name in names:
            stack.start(name, "worker")
        sweeper_port = free_port() if sweeper else None
        if sweeper_port is not None:
            stack.start("sweeper", "sweeper", env=stack.env(FERRY_METRICS_PORT=str(sweeper_port)))
        await stack.wait_ready("fake-provider", f"{stack.fake_url}/healthz")
        await stack.wait_ready("api", f"{stack.url}/readyz")
        if sweeper_port is not None:  # it serves /metrics once its database pool is open
            await stack.wait_ready("sweeper", f"http://127.0.0.1:{sweeper_port}/metrics")
        await stack.wait_consumers(names)
        yield stack
    finally:
        stack.stop_all()
        # The run, or the same run id on the stack's own server and broker: removes its
        # database and queues wherever they are.
        where = TestRun(run.id, server_url, stack.broker_url)
        await where.drop_database(database_url)
        if not throwaway_broker:
            await where.delete_namespaces([stack.namespace])
        run.namespaces.discard(stack.namespace)


def _with_database(server_url: str, name: str) -> str:
    return urlunsplit(urlsplit(server_url)._replace(path="/" + name))
