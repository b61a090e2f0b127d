"""The front door: application factory and process entry point."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from api.admin import add_routes as add_admin_routes
from api.admission import Admission
from api.auth import Gate
from api.batches import add_routes as add_batch_routes
from api.batchlane import Batches
from api.interactive import serve_interactive
from api.limits import Limiter
from api.messages import authenticate, count_tokens, create_message
from api.middleware import errors_middleware
from api.models import ModelCatalog, find, page
from api.replies import ReplyRouter
from api.responses import json_response
from api.server import FerryRunner, expect_handler, no_banner
from api.state import (
    ADMISSION,
    BATCHES,
    BROKER,
    CATALOG,
    CHECKER,
    GATE,
    KEYSTORE,
    LIMITER,
    METRICS,
    MODE,
    PROVIDERS,
    REPLIES,
    REQUEST_ID_KEY,
    SETTINGS,
    STORE,
    SUBMITS,
    WAITERS,
    WEBHOOKS,
)
from api.submit import SubmitBatcher
from api.validation import BodyChecker
from api.waiters import JobWaiters
from api.webhooks import WebhookDirectory
from shared import runtime
from shared.batchstore import BatchStore
from shared.broker import Broker
from shared.errors import FerryError, Unavailable
from shared.jobs import JobEnvelope, new_job_id
from shared.keystore import KeyStore
from shared.logging import get_logger
from shared.metrics import Metrics, metrics_server
from shared.migrate import missing_migrations
from shared.providers import load_providers
from shared.runtime import Lifecycle, cancel_requested, stop_task
from shared.settings import Settings
from shared.store import Store
from shared.webhookstore import WebhookStore

log = get_logger("ferry.api")

LISTEN_BACKLOG = 4096


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    app[STORE] = store = await Store.connect(settings.database_url,
                                             max_size=settings.db_pool_size,
                                             timeout_s=settings.db_connect_timeout_s)
    app[KEYSTORE] = keystore = KeyStore(store)
    app[GATE] = Gate(keystore if settings.auth == "keys" else None, settings.database_url)
    app[LIMITER] = Limiter(keystore, settings.request_timeout_s + 60)
    app[WAITERS] = JobWaiters(store, settings.database_url, settings.db_connect_timeout_s,
                              app[METRICS].long_polls)
    app[WEBHOOKS] = WebhookDirectory(WebhookStore(store), settings.database_url)
    async with app[GATE].running(), app[WAITERS].running(), app[WEBHOOKS].running():
        yield
    await store.close()


async def _admission_ctx(app: web.Application) -> AsyncIterator[None]:
    async with app[ADMISSION].probing():
        yield


async def _checker_ctx(app: web.Application) -> AsyncIterator[None]:
    async with app[CHECKER].running():
        yield


async def _broker_ctx(app: web.Application) -> AsyncIterator[None]:
    app[BROKER] = broker = await Broker.connect(app[SETTINGS], role="api")
    store = app[STORE]
    app[BATCHES] = batches = Batches(BatchStore(store, app[SETTINGS].database_url), broker)
    app[SUBMITS] = submits = SubmitBatcher(store, broker)
    app[REPLIES] = replies = ReplyRouter()
    await replies.start(broker)
    async with batches.running():
        yield
    await submits.drain()
    replies.fail_all()
    await broker.close()


async def _stats_ctx(app: web.Application) -> AsyncIterator[None]:
    """Queue depths and unfinished-job counts for /metrics (what autoscalers read)."""
    task = asyncio.create_task(_refresh_stats(app), name="stats")
    yield
    await stop_task(task)


async def _refresh_stats(app: web.Application) -> None:
    metrics, broker, store = app[METRICS], app[BROKER], app[STORE]
    while True:
        try:
            for lane, depth in (await broker.queue_depths()).items():
                metrics.queue_depth.labels(lane).set(depth)
            for status, count in (await store.unfinished_counts()).items():
                metrics.jobs_unfinished.labels(status).set(count)
        except Exception as exc:  # stale figures beat a dead loop; say why once per round
            if cancel_requested():
                raise asyncio.CancelledError from exc
            log.warning("could not refresh stats", error=f"{type(exc).__name__}: {exc}")
        await asyncio.sleep(app[SETTINGS].stats_interval_s)


async def _metrics_ctx(app: web.Application) -> AsyncIterator[None]:
    """/metrics on the metrics port, not the client port: it shows every caller's traffic."""
    async with metrics_server(app[SETTINGS], app[METRICS]):
        yield


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def root(request: web.Request) -> web.Response:
    """Some clients probe the base URL before anything else."""
    return json_response({"status": "ok", "service": "ferry"})


async def readyz(request: web.Request) -> web.Response:
    problems = []
    try:
        missing = await missing_migrations(request.app[STORE])
        if missing:
            problems.append(f"database: lacks migrations {', '.join(map(str, missing))}"
                            " (run `ferry migrate`)")
    except FerryError as exc:
        problems.append(f"database: {exc.message}")
    if not request.app[BROKER].is_connected:
        problems.append("broker: not connected")
    if problems:
        return json_response({"status": "unavailable", "problems": problems}, status=503)
    return json_response({"status": "ready"})


async def _fetch_models(request: web.Request) -> bytes:
    """Ask a worker for the providers' own model lists (the api holds no provider keys)."""
    settings = request.app[SETTINGS]
    envelope = JobEnvelope(
        job_id=new_job_id(), model="models", body=b"", mode="sync", operation="models",
        request_id=request.get(REQUEST_ID_KEY), reply_to=request.app[REPLIES].reply_to,
        pickup_deadline=time.time() + settings.pickup_timeout_s)
    request.app[ADMISSION].admit()
    response = await serve_interactive(request, envelope)
    if response.status != 200 or not isinstance(response, web.Response) or \
            response.body is None:
        raise Unavailable("the model lists could not be fetched")
    return bytes(response.body)  # type: ignore[arg-type]


async def list_models(request: web.Request) -> web.Response:
    request[MODE] = "models"
    await authenticate(request)
    models = await request.app[CATALOG].models(lambda: _fetch_models(request))
    query = request.query
    return json_response(page(models, query.get("after_id"), query.get("before_id"),
                              query.get("limit")))


async def get_model(request: web.Request) -> web.Response:
    request[MODE] = "models"
    await authenticate(request)
    models = await request.app[CATALOG].models(lambda: _fetch_models(request))
    return json_response(find(models, request.match_info["model_id"]))


def create_app(settings: Settings) -> web.Application:
    app = web.Application(client_max_size=settings.max_body_bytes,
                          middlewares=[errors_middleware])
    app[SETTINGS] = settings
    app[PROVIDERS] = providers = load_providers(settings)
    app[METRICS] = metrics = Metrics()
    metrics.known_models = providers.known_models()
    app[CHECKER] = BodyChecker(settings.parse_offload_bytes)
    app[ADMISSION] = Admission(target_s=settings.admission_target_s,
                               interval_s=settings.admission_interval_s,
                               max_wait_s=settings.admission_wait_s,
                               max_in_flight=settings.admission_max_in_flight,
                               lag_target_s=settings.admission_lag_target_s,
                               min_queue=settings.admission_min_queue)
    app[CATALOG] = ModelCatalog(providers, metrics)
    app.on_response_prepare.append(no_banner)
    app.cleanup_ctx.append(_store_ctx)
    app.cleanup_ctx.append(_checker_ctx)
    app.cleanup_ctx.append(_broker_ctx)
    app.cleanup_ctx.append(_admission_ctx)
    app.cleanup_ctx.append(_stats_ctx)
    app.cleanup_ctx.append(_metrics_ctx)
    app.router.add_post("/anthropic/v1/messages", create_message, expect_handler=expect_handler)
    app.router.add_post("/anthropic/v1/messages/count_tokens", count_tokens,
                        expect_handler=expect_handler)
    add_batch_routes(app)
    app.router.add_get("/anthropic/v1/models", list_models)
    app.router.add_get("/anthropic/v1/models/{model_id:.+}", get_model)
    app.router.add_get("/", root)  # GET also answers HEAD
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    if settings.admin_key is not None:
        add_admin_routes(app)
    return app


# aiohttp's defaults, made explicit; decompression is Ferry's own (api/body.py).
_HANDLER_ARGS: dict[str, Any] = {"auto_decompress": False, "max_line_size": 8190,
                                 "max_field_size": 8190, "max_headers": 128}


async def serve(settings: Settings, life: Lifecycle) -> None:
    # keepalive_timeout bounds a connection that sends nothing, or stalls in its headers, as
    # FERRY_BODY_TIMEOUT bounds a stalled body (aiohttp's default is an hour).
    runner = FerryRunner(create_app(settings), access_log=None, handler_cancellation=True,
                         keepalive_timeout=settings.body_timeout_s, **_HANDLER_ARGS)
    await runner.setup()
    try:
        # A deep accept queue (the kernel caps it at net.core.somaxconn): with aiohttp's 128, a
        # burst of new connections (thousands of long polls) has SYNs dropped and retried
        # seconds later.
        site = web.TCPSite(runner, settings.host, settings.port, backlog=LISTEN_BACKLOG)
        await site.start()
        log.info("api listening", host=settings.host, port=settings.port,
                 namespace=settings.namespace)
        life.started = True
        # What start-up made (modules, pools, the app) lives as long as the process: moved out
        # of the collector's reach, a full collection scans only what requests left, and no
        # longer stalls every request in flight for tens of milliseconds.
        gc.freeze()
        await life.stop.wait()
        log.info("api stopping")
    finally:
        await runner.cleanup()


def run(settings: Settings) -> None:
    runtime.serve(lambda life: serve(settings, life))

