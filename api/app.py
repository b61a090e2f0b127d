"""The front door: application factory and process entry point."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from aiohttp import web

from api.keys import BROKER, METRICS, PROVIDERS, REPLIES, SETTINGS, STORE, SUBMITS
from api.messages import create_message
from api.middleware import errors_middleware
from api.replies import ReplyRouter
from api.responses import json_response
from api.submit import SubmitBatcher
from shared import runtime
from shared.broker import Broker
from shared.logging import get_logger
from shared.metrics import CONTENT_TYPE, Metrics
from shared.providers import load_providers
from shared.settings import Settings
from shared.store import Store

log = get_logger("ferry.api")


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    app[STORE] = await Store.connect(settings.database_url, max_size=settings.db_pool_size)
    yield
    await app[STORE].close()


async def _broker_ctx(app: web.Application) -> AsyncIterator[None]:
    app[BROKER] = broker = await Broker.connect(app[SETTINGS])
    app[SUBMITS] = SubmitBatcher(app[STORE], broker)
    app[REPLIES] = replies = ReplyRouter()
    await replies.start(broker)
    broker.on_reconnect(replies.fail_all)
    yield
    replies.fail_all()
    await broker.close()


async def _stats_ctx(app: web.Application) -> AsyncIterator[None]:
    """Queue depths and unfinished-job counts for /metrics (what autoscalers read)."""
    task = asyncio.create_task(_refresh_stats(app))
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _refresh_stats(app: web.Application) -> None:
    metrics, broker, store = app[METRICS], app[BROKER], app[STORE]
    while True:
        try:
            for lane, depth in (await broker.queue_depths()).items():
                metrics.queue_depth.labels(lane).set(depth)
            for status, count in (await store.unfinished_counts()).items():
                metrics.jobs_unfinished.labels(status).set(count)
        except Exception as exc:  # stale figures beat a dead loop; say why once per round
            log.warning("could not refresh stats", error=f"{type(exc).__name__}: {exc}")
        # aio-pika can swallow a cancellation that lands while it closes a channel; honour
        # it here, or shutdown would wait on this loop forever.
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise asyncio.CancelledError
        await asyncio.sleep(app[SETTINGS].stats_interval_s)


async def metrics_endpoint(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].render(),
                        headers={"Content-Type": CONTENT_TYPE})


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    problems = []
    try:
        await request.app[STORE].ping()
    except Exception as exc:  # any failure means not ready; say which
        problems.append(f"database: {type(exc).__name__}")
    if not request.app[BROKER].is_connected:
        problems.append("broker: not connected")
    if problems:
        return json_response({"status": "unavailable", "problems": problems}, status=503)
    return json_response({"status": "ready"})


def create_app(settings: Settings) -> web.Application:
    app = web.Application(client_max_size=settings.max_body_bytes,
                          middlewares=[errors_middleware])
    app[SETTINGS] = settings
    app[PROVIDERS] = load_providers(settings)
    app[METRICS] = Metrics()
    app.cleanup_ctx.append(_store_ctx)
    app.cleanup_ctx.append(_broker_ctx)
    app.cleanup_ctx.append(_stats_ctx)
    app.router.add_post("/anthropic/v1/messages", create_message)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_endpoint)
    return app


def run(settings: Settings) -> None:
    log.info("api starting", host=settings.host, port=settings.port,
             namespace=settings.namespace)
    web.run_app(create_app(settings), host=settings.host, port=settings.port,
                loop=runtime.loop_factory()(),
                access_log=None, print=None, handle_signals=True,
                handler_cancellation=True)
