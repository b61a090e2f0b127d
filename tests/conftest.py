"""Fixtures shared by the integration and acceptance tests.

Where PostgreSQL and RabbitMQ are; one database per test, copied from a template migrated once
per run; a broker namespace per test (or per acceptance module); the fake provider. Everything a
run creates is named after its run id and removed when the session ends.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import asyncpg
import pytest
import pytest_asyncio
from aiohttp import web

from fakeprovider.server import create_app as create_fake_provider
from shared.broker import delete_topology
from shared.migrate import migrate
from shared.settings import Settings

DATABASE_ENV = "FERRY_TEST_DATABASE_URL"
AMQP_ENV = "FERRY_TEST_AMQP_URL"
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


# --- where the services are -----------------------------------------------------------------


def _reachable(url: str, default_port: int) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1",
                                       parts.port or default_port), timeout=2):
            return True
    except OSError:
        return False


def _docker_available() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], check=False, capture_output=True,
                              timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/" + name))


def _service_url(what: str, env_var: str, default: str, default_port: int) -> str | None:
    """The URL to use, or None when a container should be started; fails when neither works."""
    explicit = os.environ.get(env_var)
    if explicit:
        if not _reachable(explicit, default_port):
            pytest.fail(f"{what} at {env_var}={explicit} is not reachable", pytrace=False)
        return explicit
    if _reachable(default, default_port):
        return default
    if _docker_available():
        return None
    pytest.fail(
        f"{what} is not reachable at {default}, {env_var} is not set and Docker is not "
        f"available to start one. Start {what} locally or set {env_var}.",
        pytrace=False,
    )


@pytest.fixture(scope="session")
def postgres_server_url() -> Iterator[str]:
    """A server-level URL (naming an existing database such as `postgres`)."""
    url = _service_url("PostgreSQL", DATABASE_ENV, DEFAULT_DATABASE_URL, 5432)
    if url is not None:
        yield url
        return
    try:
        from testcontainers.community.postgres import PostgresContainer
    except ImportError:  # testcontainers before the `community` split
        from testcontainers.postgres import PostgresContainer
    with PostgresContainer("postgres:15") as container:
        yield _with_database(container.get_connection_url(driver=None), "postgres")


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    url = _service_url("RabbitMQ", AMQP_ENV, DEFAULT_AMQP_URL, 5672)
    if url is not None:
        yield url
        return
    try:
        from testcontainers.community.rabbitmq import RabbitMqContainer
    except ImportError:
        from testcontainers.rabbitmq import RabbitMqContainer
    with RabbitMqContainer("rabbitmq:3.10-management") as container:
        host = container.get_container_host_ip()
        port = container.get_exposed_port(container.port)
        yield f"amqp://{container.username}:{container.password}@{host}:{port}/"


# --- the run: its databases and broker namespaces -------------------------------------------

# A run holds this advisory lock (on the `postgres` database) while it lives, and lists its
# broker namespaces in a file here; a later run removes what a killed run left behind.
_RUN_LOCK_CLASS = 0x6674  # "ft"
_REGISTRY_DIR = Path(tempfile.gettempdir()) / "ferrytest-runs"


@dataclass
class TestRun:
    """Names and cleanup for one pytest session."""

    __test__ = False  # not a test class

    id: str
    server_url: str
    amqp_url: str
    namespaces: set[str] = field(default_factory=set)
    _counter: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def prefix(self) -> str:
        return f"ferrytest_{self.id}"

    @property
    def namespace(self) -> str:
        """The run's broker namespace; tests use it plus a suffix so queues never collide."""
        return self.prefix

    @property
    def template(self) -> str:
        return f"{self.prefix}_tmpl"

    @property
    def registry(self) -> Path:
        return _REGISTRY_DIR / f"{self.id}.namespaces"

    def database_url(self, name: str) -> str:
        return _with_database(self.server_url, name)

    def new_database_name(self) -> str:
        return f"{self.prefix}_db{next(self._counter)}"

    def new_namespace(self, suffix: str | None = None) -> str:
        namespace = f"{self.namespace}_{suffix or next(self._counter)}"
        self.namespaces.add(namespace)
        with self.registry.open("a") as registry:
            registry.write(namespace + "\n")
        return namespace

    async def create_database(self, template: str | None = None) -> str:
        name = self.new_database_name()
        conn = await asyncpg.connect(self.server_url)
        try:
            clause = f' TEMPLATE "{template}"' if template else ""
            await conn.execute(f'CREATE DATABASE "{name}"{clause}')
        finally:
            await conn.close()
        return self.database_url(name)

    async def drop_database(self, url: str) -> None:
        name = urlsplit(url).path.lstrip("/")
        assert name.startswith(self.prefix), f"refusing to drop {name!r}: not this run's"
        conn = await asyncpg.connect(self.server_url)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    async def drop_all_databases(self) -> None:
        conn = await asyncpg.connect(self.server_url)
        try:
            names = await conn.fetch(
                "SELECT datname FROM pg_database WHERE starts_with(datname, $1)", self.prefix + "_"
            )
            for row in names:
                await conn.execute(f'DROP DATABASE IF EXISTS "{row["datname"]}" WITH (FORCE)')
        finally:
            await conn.close()

    async def delete_namespaces(self, namespaces: Iterable[str] | None = None) -> None:
        """Delete the queues and exchanges of `namespaces` (default: all the run's)."""
        todo = sorted(self.namespaces if namespaces is None else namespaces)
        if not todo:
            return
        connection = await connect_any(self.amqp_url)
        try:
            channel = await connection.channel()
            for namespace in todo:
                settings = Settings(amqp_url=self.amqp_url, namespace=namespace)
                await delete_topology(channel, settings)
                self.namespaces.discard(namespace)
        finally:
            await connection.close()

    async def clean_up(self) -> None:
        await self.drop_all_databases()  # the template, and any database a failed test left
        await self.delete_namespaces()
        self.registry.unlink(missing_ok=True)


async def _hold_run_lock(admin: asyncpg.Connection, run_id: str) -> None:
    await admin.execute("SELECT pg_advisory_lock($1, hashtext($2))", _RUN_LOCK_CLASS, run_id)


async def _try_run_lock(admin: asyncpg.Connection, run_id: str) -> bool:
    return bool(await admin.fetchval("SELECT pg_try_advisory_lock($1, hashtext($2))",
                                     _RUN_LOCK_CLASS, run_id))


async def _remove_dead_runs(admin: asyncpg.Connection, run: TestRun) -> None:
    """What runs killed before their teardown left: their lock is free, their registry stays."""
    for registry in _REGISTRY_DIR.glob("*.namespaces"):
        run_id = registry.stem
        if run_id == run.id or not await _try_run_lock(admin, run_id):
            continue  # this run, or one that is still going
        try:
            dead = TestRun(run_id, run.server_url, run.amqp_url)
            dead.namespaces.update(registry.read_text().split())
            await dead.clean_up()
        finally:
            await admin.execute("SELECT pg_advisory_unlock($1, hashtext($2))",
                                _RUN_LOCK_CLASS, run_id)


async def connect_any(amqp_url: str) -> aio_pika.abc.AbstractConnection:
    """A connection to the first node of `amqp_url` (one URL, or a cluster's list) that
    answers."""
    error: Exception | None = None
    for url in (u.strip() for u in amqp_url.split(",") if u.strip()):
        try:
            return await aio_pika.connect(url, timeout=10)
        except Exception as exc:  # the next node, then
            error = exc
    raise ConnectionError(f"no node of {amqp_url} answered: {error}")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    # `timeout` and CI runners stop a run with SIGTERM: unwind as for Ctrl-C, so the session's
    # teardown still removes its databases and queues.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)


HANG_DUMP_LEAD_S = 60  # the asyncio tasks are printed this long before pytest-timeout fires


def _print_tasks() -> None:
    """Every task of the running loop with where it waits (pytest-timeout shows threads only,
    and a hung teardown is one await among many tasks)."""
    tasks = asyncio.all_tasks()
    print(f"+++ {len(tasks)} asyncio tasks near the timeout +++", file=sys.stderr)
    for task in tasks:
        print(f"{task!r}", file=sys.stderr)
        awaitable: Any = task.get_coro()
        while awaitable is not None:  # the chain of awaits, outermost first
            frame = getattr(awaitable, "cr_frame", None) or getattr(awaitable, "ag_frame", None)
            if frame is not None:
                print(f"    {frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}",
                      file=sys.stderr)
            awaitable = getattr(awaitable, "cr_await", None) or getattr(awaitable, "ag_await", None)
            if awaitable is not None and not hasattr(awaitable, "cr_frame") and not hasattr(
                    awaitable, "ag_frame"):
                print(f"    awaits {awaitable!r}"[:300], file=sys.stderr)
                break


def _dump_asyncio_tasks() -> None:
    for loop in [o for o in gc.get_objects() if isinstance(o, asyncio.AbstractEventLoop)]:
        if loop.is_running() and not loop.is_closed():
            loop.call_soon_threadsafe(_print_tasks)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    timeout = float(item.config.getini("timeout") or 0)
    timer = None
    if timeout > HANG_DUMP_LEAD_S:
        timer = threading.Timer(timeout - HANG_DUMP_LEAD_S, _dump_asyncio_tasks)
        timer.daemon = True
        timer.start()
    try:
        yield
    finally:
        if timer is not None:
            timer.cancel()


@pytest_asyncio.fixture(scope="session")
async def test_run(postgres_server_url: str, amqp_url: str) -> AsyncIterator[TestRun]:
    run = TestRun(uuid.uuid4().hex[:10], postgres_server_url, amqp_url)
    admin = await asyncpg.connect(postgres_server_url)  # holds the run's lock while it lives
    try:
        await _hold_run_lock(admin, run.id)  # before the registry shows the run exists
        _REGISTRY_DIR.mkdir(exist_ok=True)
        run.registry.touch()
        await _remove_dead_runs(admin, run)
        yield run
    finally:
        try:
            await run.clean_up()
        finally:
            await admin.close()


@pytest_asyncio.fixture(scope="session")
async def template_database(test_run: TestRun) -> str:
    """Migrated once per run; each test gets a copy (dropped with the run)."""
    await migrate(test_run.database_url(test_run.template))
    return test_run.template


@pytest_asyncio.fixture
async def database_url(test_run: TestRun, template_database: str) -> AsyncIterator[str]:
    """A fresh, migrated database of this test's own."""
    url = await test_run.create_database(template=template_database)
    yield url
    await test_run.drop_database(url)


@pytest_asyncio.fixture
async def namespace(test_run: TestRun) -> AsyncIterator[str]:
    """A broker namespace of this test's own, so messages never leak between tests; its
    queues are deleted right after the test, so even a killed run leaves little behind."""
    namespace = test_run.new_namespace()
    yield namespace
    await test_run.delete_namespaces([namespace])


@pytest.fixture
def settings(test_run: TestRun, database_url: str, namespace: str) -> Callable[..., Settings]:
    """`settings(**overrides)`: Settings pointing at this test's database and namespace."""

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "database_url": database_url,
            "amqp_url": test_run.amqp_url,
            "namespace": namespace,
            "retry_base_s": 0.01,  # tests do not wait through real backoffs
            "auth": "off",  # tests of gateway keys ask for FERRY_AUTH=keys themselves
            "metrics_port": 0,  # in-process apps and workers serve no /metrics port
        }
        values.update(overrides)
        return Settings(**values)

    return make


# --- the fake provider ------------------------------------------------------------------------


@pytest_asyncio.fixture(scope="session")
async def fake_provider() -> AsyncIterator[str]:
    """The fake Anthropic upstream served in this process; yields its base URL."""
    runner = web.AppRunner(create_fake_provider(), handler_cancellation=True)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port = runner.addresses[0][1]
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
