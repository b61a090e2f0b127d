"""Process entry points for `ferry worker` and `ferry sweeper`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Mapping

import aiohttp
from aiohttp import web

from shared import runtime
from shared.broker import Broker
from shared.logging import get_logger
from shared.metrics import CONTENT_TYPE, Metrics
from shared.providers import ProviderConfig, Providers, load_providers
from shared.settings import Settings
from shared.store import Store
from worker.providers.anthropic import AnthropicProvider
from worker.providers.base import Provider
from worker.providers.openai import OpenAIProvider
from worker.retry import RetryPolicy
from worker.routing import KeyPool, ProviderEntry, ProviderSet
from worker.sweeper import Sweeper
from worker.worker import Worker

log = get_logger("ferry.worker")


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


def resolve_key(value: str, environ: Mapping[str, str]) -> str:
    """`env:NAME` reads the key from the environment; anything else is the key itself."""
    if value.startswith("env:"):
        name = value[4:]
        if name not in environ:
            raise ValueError(f"provider key refers to ${name}, which is not set")
        return environ[name]
    return value


def build_provider(config: ProviderConfig, settings: Settings,
                   session: aiohttp.ClientSession) -> Provider:
    timeout = config.timeout_s or settings.provider_timeout_s
    if config.type == "anthropic":
        return AnthropicProvider(session, config.base_url, None, settings.anthropic_version,
                                 timeout)
    return OpenAIProvider(session, config.name, config.base_url, None, timeout)


def build_providers(settings: Settings, providers: Providers, session: aiohttp.ClientSession,
                    environ: Mapping[str, str] = os.environ,
                    metrics: Metrics | None = None) -> ProviderSet:
    entries = {}
    for name, config in providers.configs.items():
        keys = [(resolve_key(k.key, environ), k.weight) for k in config.keys]
        entries[name] = ProviderEntry(
            provider=build_provider(config, settings, session),
            keys=KeyPool(keys, config.key_cooldown_s if config.key_cooldown_s is not None
                         else settings.key_cooldown_s),
            retry=RetryPolicy(config.max_attempts or settings.provider_max_attempts,
                              config.retry_base_s if config.retry_base_s is not None
                              else settings.retry_base_s,
                              config.retry_max_s if config.retry_max_s is not None
                              else settings.retry_max_s),
        )
    return ProviderSet(entries, metrics)


@contextlib.asynccontextmanager
async def metrics_server(settings: Settings, metrics: Metrics) -> AsyncIterator[None]:
    """`/metrics` on this process's own port (FERRY_METRICS_PORT; 0 turns it off)."""
    if not settings.metrics_port:
        yield
        return

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    app = web.Application()
    app.router.add_get("/metrics", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, settings.host, settings.metrics_port).start()
    try:
        yield
    finally:
        await runner.cleanup()


async def _run_worker(settings: Settings) -> None:
    stop = _stop_on_signals()
    providers = load_providers(settings)
    store = await Store.connect(settings.database_url, min_size=1,
                                max_size=min(settings.db_pool_size, settings.worker_concurrency))
    broker = await Broker.connect(settings)
    connector = aiohttp.TCPConnector(
        limit=(settings.worker_concurrency + settings.interactive_concurrency) * 2
    )
    metrics = Metrics()
    try:
        async with aiohttp.ClientSession(connector=connector) as session, \
                metrics_server(settings, metrics):
            provider_set = build_providers(settings, providers, session, metrics=metrics)
            log.info("providers configured", providers=providers.names())
            await Worker(settings, store, broker, provider_set, metrics=metrics).run(stop)
    finally:
        await broker.close()
        await store.close()


async def _run_sweeper(settings: Settings) -> None:
    stop = _stop_on_signals()
    store = await Store.connect(settings.database_url, min_size=1, max_size=2)
    metrics = Metrics()
    try:
        async with metrics_server(settings, metrics):
            await Sweeper(settings, store, metrics).run(stop)
    finally:
        await store.close()


def run_worker(settings: Settings) -> None:
    runtime.run(_run_worker(settings))


def run_sweeper(settings: Settings) -> None:
    runtime.run(_run_sweeper(settings))
