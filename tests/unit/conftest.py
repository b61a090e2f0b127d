"""Unit-test fixtures: the fake provider in process, on a free port, for adapter tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio
from aiohttp import ClientSession, web

from fakeprovider.server import create_app


@pytest_asyncio.fixture(scope="module")
async def base_url() -> AsyncIterator[str]:
    runner = web.AppRunner(create_app(), handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


@pytest_asyncio.fixture(scope="module")
async def http() -> AsyncIterator[ClientSession]:
    async with ClientSession() as session:
        yield session
