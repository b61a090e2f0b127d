"""Process entry points for `ferry worker` and `ferry sweeper`."""

from __future__ import annotations

import asyncio
import signal

import aiohttp

from shared.broker import Broker
from shared.logging import get_logger
from shared.settings import Settings
from shared.store import Store
from worker.providers.anthropic import AnthropicProvider
from worker.providers.base import Provider
from worker.sweeper import Sweeper
from worker.worker import Worker

log = get_logger("ferry.worker")


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


def build_providers(settings: Settings, session: aiohttp.ClientSession) -> dict[str, Provider]:
    key = settings.anthropic_api_key.get_secret_value() if settings.anthropic_api_key else None
    return {
        "anthropic": AnthropicProvider(session, settings.anthropic_base_url, key,
                                       settings.anthropic_version, settings.provider_timeout_s),
    }


async def _run_worker(settings: Settings) -> None:
    stop = _stop_on_signals()
    store = await Store.connect(settings.database_url, min_size=1,
                                max_size=min(settings.db_pool_size, settings.worker_concurrency))
    broker = await Broker.connect(settings)
    connector = aiohttp.TCPConnector(limit=settings.worker_concurrency * 2)
    try:
        async with aiohttp.ClientSession(connector=connector) as session:
            worker = Worker(settings, store, broker, build_providers(settings, session))
            await worker.run(stop)
    finally:
        await broker.close()
        await store.close()


async def _run_sweeper(settings: Settings) -> None:
    stop = _stop_on_signals()
    store = await Store.connect(settings.database_url, min_size=1, max_size=2)
    try:
        await Sweeper(settings, store).run(stop)
    finally:
        await store.close()


def run_worker(settings: Settings) -> None:
    asyncio.run(_run_worker(settings))


def run_sweeper(settings: Settings) -> None:
    asyncio.run(_run_sweeper(settings))
