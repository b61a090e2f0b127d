"""Process entry points for `ferry worker` and `ferry sweeper`."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping

import aiohttp

from shared import runtime
from shared.broker import Broker
from shared.keystore import KeyStore
from shared.logging import get_logger
from shared.metrics import Metrics, metrics_server
from shared.migrate import require_schema
from shared.pacestore import PaceStore
from shared.providers import ProviderConfig, Providers, load_providers
from shared.runtime import Lifecycle
from shared.settings import Settings
from shared.store import Store
from worker.pacing import KeyLimits, Pacer
from worker.providers.anthropic import AnthropicProvider
from worker.providers.base import Provider
from worker.providers.openai import OpenAIProvider
from worker.reconciler import Reconciler
from worker.retry import RetryPolicy
from worker.routing import KeyPool, ProviderEntry, ProviderSet
from worker.sweeper import Sweeper
from worker.usage import TokenMeter
from worker.worker import Worker

log = get_logger("ferry.worker")


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
    idle = min(timeout, settings.stream_idle_timeout_s)
    if config.type == "anthropic":
        return AnthropicProvider(session, config.base_url, None, settings.anthropic_version,
                                 timeout, name=config.name, stream_idle_s=idle)
    return OpenAIProvider(session, config.name, config.base_url, None, timeout,
                          stream_idle_s=idle)


def build_providers(settings: Settings, providers: Providers, session: aiohttp.ClientSession,
                    environ: Mapping[str, str] = os.environ,
                    metrics: Metrics | None = None,
                    pace_store: PaceStore | None = None) -> ProviderSet:
    entries = {}
    limits: dict[tuple[str, str], KeyLimits] = {}
    for name, config in providers.configs.items():
        keys = [(resolve_key(k.key, environ), k.weight) for k in config.keys]
        for (secret, _), k in zip(keys, config.keys, strict=True):
            limits[(name, secret)] = KeyLimits(k.rpm, k.tpm, k.max_concurrency)
        entries[name] = ProviderEntry(
            provider=build_provider(config, settings, session),
            keys=KeyPool(keys, config.key_cooldown_s if config.key_cooldown_s is not None
                         else settings.key_cooldown_s),
            retry=RetryPolicy(config.max_attempts or settings.provider_max_attempts,
                              config.retry_base_s if config.retry_base_s is not None
                              else settings.retry_base_s,
                              config.retry_max_s if config.retry_max_s is not None
                              else settings.retry_max_s,
                              settings.max_rate_limited),
        )
    pacer = Pacer(pace_store, limits, metrics, learn=settings.pacing,
                  lease_s=settings.provider_timeout_s + 60)
    return ProviderSet(entries, metrics, pacer, settings.pace_horizon_s)


async def _run_worker(settings: Settings, life: Lifecycle) -> None:
    providers = load_providers(settings)
    store = await Store.connect(settings.database_url, min_size=1,
                                max_size=min(settings.db_pool_size, settings.worker_concurrency),
                                timeout_s=settings.db_connect_timeout_s)
    try:
        await require_schema(store)
        broker = await Broker.connect(settings, role="worker")
        connector = aiohttp.TCPConnector(
            limit=(settings.worker_concurrency + settings.interactive_concurrency) * 2
        )
        metrics = Metrics()
        try:
            async with aiohttp.ClientSession(connector=connector) as session, \
                    metrics_server(settings, metrics):
                provider_set = build_providers(settings, providers, session, metrics=metrics,
                                               pace_store=PaceStore(store))
                log.info("providers configured", providers=providers.names())
                life.started = True
                await Worker(settings, store, broker, provider_set, metrics=metrics,
                             meter=TokenMeter(KeyStore(store))).run(life.stop)
        finally:
            await broker.close()
    finally:
        await store.close()


async def _run_sweeper(settings: Settings, life: Lifecycle) -> None:
    """The sweeper and the reconciler: the maintenance process (any number of replicas)."""
    store = await Store.connect(settings.database_url, min_size=1, max_size=4,
                                timeout_s=settings.db_connect_timeout_s)
    try:
        await require_schema(store)
        broker = await Broker.connect(settings, role="sweeper")
        metrics = Metrics()
        try:
            async with metrics_server(settings, metrics):
                life.started = True
                await asyncio.gather(
                    Sweeper(settings, store, metrics).run(life.stop),
                    Reconciler(settings, store, broker, metrics).run(life.stop),
                )
        finally:
            await broker.close()
    finally:
        await store.close()


def run_worker(settings: Settings) -> None:
    runtime.serve(lambda life: _run_worker(settings, life))


def run_sweeper(settings: Settings) -> None:
    runtime.serve(lambda life: _run_sweeper(settings, life))
