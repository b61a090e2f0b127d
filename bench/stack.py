"""Ferry's real processes for the bench: fake provider, migrate, api, workers, sweeper; and the
bare aiohttp ceiling. Each is `python -m shared.cli ...` (what `ferry ...` runs) with the
bench's own namespace, database and environment."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from dataclasses import dataclass, field

import aio_pika
import aiohttp

from bench.procs import BenchError, Processes, free_port, log_tail, peak_rss_mib, wait_http

FERRY = [sys.executable, "-m", "shared.cli"]
API_KEY = "sk-ferry-bench-key-0001"
MODEL = "claude-bench"

# The environment every Ferry process gets; scenarios add to it (e.g. worker concurrency).
BASE_ENV = {
    "FERRY_LOG_LEVEL": "warning",
    "FERRY_LOG_FORMAT": "json",
    "FERRY_SHUTDOWN_GRACE": "2",
    "PYTHONUNBUFFERED": "1",
}


@dataclass
class FerryStack:
    procs: Processes
    namespace: str
    database_url: str
    amqp_url: str
    api_port: int = field(default_factory=free_port)
    fake_port: int = field(default_factory=free_port)
    bare_port: int = field(default_factory=free_port)
    floor_port: int = field(default_factory=free_port)
    api_metrics_port: int = field(default_factory=free_port)
    workers: list[str] = field(default_factory=list)
    worker_env: dict[str, str] = field(default_factory=dict)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def api_metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.api_metrics_port}"

    @property
    def fake_url(self) -> str:
        return f"http://127.0.0.1:{self.fake_port}"

    @property
    def bare_url(self) -> str:
        return f"http://127.0.0.1:{self.bare_port}"

    @property
    def floor_url(self) -> str:
        return f"http://127.0.0.1:{self.floor_port}"

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("FERRY_", "ANTHROPIC_", "OPENAI_"))
               and k not in ("DATABASE_URL", "AMQP_URL")}
        env.update(BASE_ENV)
        env.update(
            DATABASE_URL=self.database_url,
            AMQP_URL=self.amqp_url,
            FERRY_NAMESPACE=self.namespace,
            FERRY_HOST="127.0.0.1",
            FERRY_PORT=str(self.api_port),
            ANTHROPIC_BASE_URL=self.fake_url,
            ANTHROPIC_API_KEY="sk-bench-upstream",
        )
        env.update(extra or {})
        return env

    async def start(self) -> None:
        self.procs.start("fake-provider",
                         [*FERRY, "fake-provider", "--port", str(self.fake_port)], self.env())
        await wait_http(f"{self.fake_url}/healthz", self.procs, "fake-provider")
        migrate = self.procs.start("migrate", [*FERRY, "migrate"], self.env())
        code = await asyncio.to_thread(migrate.wait)
        if code != 0:
            raise BenchError(f"ferry migrate failed ({code}):\n"
                             f"{log_tail(self.procs.logs['migrate'])}")
        # A gateway key for the load generators (FERRY_AUTH=keys, the default): the bench
        # measures the authenticated path, as deployed.
        keys = self.procs.start("keys", [*FERRY, "keys", "create", "bench", "--secret",
                                         API_KEY], self.env())
        code = await asyncio.to_thread(keys.wait)
        if code != 0:
            raise BenchError(f"ferry keys create failed ({code}):\n"
                             f"{log_tail(self.procs.logs['keys'])}")
        await self.start_api()

    async def start_api(self, extra: dict[str, str] | None = None) -> None:
        """(Re)start the api, with `extra` settings on top of the run's."""
        self.procs.stop("api")
        self.procs.start("api", [*FERRY, "api"], self.env(
            {"FERRY_METRICS_PORT": str(self.api_metrics_port), **(extra or {})}))
        await wait_http(f"{self.api_url}/readyz", self.procs, "api")

    async def clear_fake_calls(self) -> None:
        async with aiohttp.ClientSession() as session, \
                session.delete(f"{self.fake_url}/_fake/calls") as resp:
            await resp.read()

    async def limit_fake(self, keys: dict[str, float]) -> None:
        """The fake provider's rate limit per key (requests/s); its buckets start full."""
        async with aiohttp.ClientSession() as session, session.post(
                f"{self.fake_url}/_fake/config", json={"rate_limit": {"keys": keys}}) as resp:
            if resp.status != 200:
                raise BenchError(f"fake provider refused the rate limit: {await resp.text()}")

    async def fake_calls_by_key(self) -> dict[str, dict[str, int]]:
        """The fake provider's recorded calls: per presented key, a count per status."""
        async with aiohttp.ClientSession() as session, \
                session.get(f"{self.fake_url}/_fake/stats") as resp:
            by_key: dict[str, dict[str, int]] = (await resp.json())["by_key"]
        return by_key

    async def start_workers(self, count: int, extra: dict[str, str] | None = None,
                            wait_interactive: bool = True) -> None:
        """(Re)start `count` workers; waits until a sync request goes through, unless the
        workers serve no interactive lane."""
        self.stop_workers()
        self.worker_env = dict(extra or {})
        for i in range(1, count + 1):
            name = f"worker.{i}"
            # Each worker serves /metrics on a port of its own (they would clash on one).
            env = self.env({"FERRY_METRICS_PORT": str(free_port()), **self.worker_env})
            self.procs.start(name, [*FERRY, "worker"], env)
            self.workers.append(name)
        if wait_interactive:
            await self.wait_worker_ready()
        else:
            await asyncio.sleep(1.0)
            for name in self.workers:
                self.procs.check_alive(name)

    async def wait_worker_ready(self, timeout_s: float = 30.0) -> None:
        body = sync_body("ready?")
        deadline = asyncio.get_running_loop().time() + timeout_s
        async with aiohttp.ClientSession() as session:
            while True:
                for name in self.workers:
                    self.procs.check_alive(name)
                try:
                    async with session.post(f"{self.api_url}/anthropic/v1/messages",
                                            data=body, headers=ferry_headers()) as resp:
                        await resp.read()
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                if asyncio.get_running_loop().time() > deadline:
                    raise BenchError("workers did not answer a sync request in time")
                await asyncio.sleep(0.2)

    def worker_peak_rss(self) -> dict[str, float | None]:
        return {name: peak_rss_mib(self.procs.get(name).pid) for name in self.workers}

    def stop_workers(self) -> None:
        if self.workers:
            self.procs.stop_many(self.workers, timeout=15)
        self.workers = []

    def start_sweeper(self, extra: dict[str, str]) -> subprocess.Popen[bytes]:
        env = self.env({"FERRY_METRICS_PORT": str(free_port()), **extra})
        return self.procs.start("sweeper", [*FERRY, "sweeper"], env)

    def stop_sweeper(self) -> None:
        self.procs.stop("sweeper")

    async def start_bare(self) -> None:
        self.procs.start("bare", [sys.executable, "-m", "bench.bare", "--port",
                                  str(self.bare_port)], self.env())
        await wait_http(f"{self.bare_url}/healthz", self.procs, "bare")

    def stop_bare(self) -> None:
        self.procs.stop("bare")

    async def start_floor(self) -> None:
        """The floor of the design (bench/floor.py): a front and a relay over the broker."""
        queue = f"{self.namespace}.floor"
        floor = [sys.executable, "-m", "bench.floor"]
        self.procs.start("floor-relay", [*floor, "relay", "--queue", queue,
                                         "--upstream", self.fake_url], self.env())
        self.procs.start("floor-front", [*floor, "front", "--queue", queue,
                                         "--port", str(self.floor_port)], self.env())
        await wait_http(f"{self.floor_url}/healthz", self.procs, "floor-front")

    def stop_floor(self) -> None:
        self.procs.stop_many(["floor-front", "floor-relay"], timeout=15)

    def stop(self) -> None:
        self.procs.stop_all()

    # --- broker housekeeping ----------------------------------------------------------------

    async def purge_queues(self) -> None:
        """Drop queued async jobs (left by submit-only scenarios) before their rows go."""
        from shared.settings import Settings

        settings = Settings.from_env(self.env())
        connection = await aio_pika.connect(self.amqp_url)
        try:
            channel = await connection.channel()
            for queue in (settings.jobs_queue, settings.interactive_queue,
                          settings.batch_queue, settings.dead_letter_queue):
                try:
                    await (await channel.declare_queue(queue, passive=True)).purge()
                except aio_pika.exceptions.ChannelNotFoundEntity:
                    channel = await connection.channel()  # the queue does not exist yet
        finally:
            await connection.close()

    async def delete_topology(self) -> None:
        """Remove every queue and exchange of the bench's namespace (Ferry's own list of
        them), without declaring anything first: a killed earlier run may have left them with
        other arguments."""
        from shared.broker import Broker
        from shared.settings import Settings

        broker = await Broker.connect(Settings.from_env(self.env()))
        try:
            await broker.delete_topology()
        finally:
            await broker.close()


def ferry_headers() -> dict[str, str]:
    return {"content-type": "application/json", "x-api-key": API_KEY,
            "anthropic-version": "2023-06-01"}


def async_headers() -> dict[str, str]:
    return {**ferry_headers(), "x-bf-async": "true"}


def sync_body(text: str = "Hello, how are you today?", *, stream: bool = False,
              max_tokens: int = 64, model: str = MODEL) -> str:
    import json

    body: dict[str, object] = {
        "model": model, "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": text}],
    }
    if stream:
        body["stream"] = True
    return json.dumps(body, separators=(",", ":"))
