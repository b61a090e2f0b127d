"""Fixtures of the fault-injection tests: a private PostgreSQL cluster and RabbitMQ node (made
once per run, only when a test asks for them, removed at the end even after a failure), and a
factory of Ferry stacks whose logs join a failing test's report."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from tests.acceptance.stack import Stack, running_stack
from tests.conftest import TestRun
from tests.faults.services import (
    PREFIX,
    PrivatePostgres,
    PrivateRabbit,
    RunLock,
    installed_postgres_version,
    missing_tools,
    rabbit_directory,
    remove_leftovers,
)
from tests.support import free_port


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "faults: stops, kills and pauses Ferry's processes and its PostgreSQL and "
                   "RabbitMQ (private ones) under load; needs root")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed:
        for value in getattr(item, "funcargs", {}).values():
            if isinstance(value, Stacks):
                for stack in value.started:
                    report.sections.extend(stack.report())
    return report


@pytest_asyncio.fixture(scope="session")
async def fault_run(test_run: TestRun) -> AsyncIterator[str]:
    """The run id the private servers are named after, its lock held; leftovers of killed
    runs removed first."""
    reason = missing_tools()
    if reason is not None:
        pytest.skip(reason)
    lock = RunLock(test_run.id)
    lock.acquire()
    try:
        for what in await remove_leftovers(test_run.id):
            print(f"removed a killed fault run's {what}")
        yield test_run.id
    finally:
        lock.release()


@pytest_asyncio.fixture(scope="session")
async def private_postgres(fault_run: str) -> AsyncIterator[PrivatePostgres]:
    server = PrivatePostgres(f"{PREFIX}_{fault_run}", free_port(),
                             await installed_postgres_version())
    try:
        await server.create()
        yield server
    finally:
        with contextlib.suppress(Exception):  # nothing to drop if create failed early
            await server.drop()


@pytest_asyncio.fixture(scope="session")
async def private_rabbit(fault_run: str) -> AsyncIterator[PrivateRabbit]:
    node = PrivateRabbit(rabbit_directory(fault_run), f"{PREFIX}_{fault_run}", free_port(),
                         free_port())
    try:
        await node.start()
        yield node
    finally:
        await node.destroy()


@dataclass
class Stacks:
    """`await stacks.start(suffix, **running_stack options)`: a stack stopped and cleaned up
    after the test."""

    run: TestRun
    log_dir: Path
    exits: contextlib.AsyncExitStack
    started: list[Stack] = field(default_factory=list)

    async def start(self, suffix: str, **options: Any) -> Stack:
        log_dir = self.log_dir / suffix
        log_dir.mkdir()
        stack = await self.exits.enter_async_context(
            running_stack(self.run, log_dir, suffix, **options))
        self.started.append(stack)
        return stack


@pytest_asyncio.fixture
async def stacks(test_run: TestRun, tmp_path: Path) -> AsyncIterator[Stacks]:
    async with contextlib.AsyncExitStack() as exits:
        yield Stacks(test_run, tmp_path, exits)

