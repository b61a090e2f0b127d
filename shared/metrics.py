"""Prometheus metrics. One `Metrics` object per process, passed to what records into it, so
tests build their own and nothing is a mutable module global."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from shared.logging import get_logger

if TYPE_CHECKING:
    from shared.settings import Settings

log = get_logger("ferry.metrics")

# Gateway overhead is small: resolve it finely below 50 ms.
_FINE = (0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.0,
         2.0, 5.0)
_COARSE = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
           300.0, 600.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        # api
        self.requests = Counter("ferry_requests", "Requests answered by the api",
                                ["mode", "model", "status"], registry=r)
        self.request_seconds = Histogram("ferry_request_duration_seconds",
                                         "Time to answer a request (streams: to the last byte)",
                                         ["mode"], buckets=_COARSE, registry=r)
        self.overhead_seconds = Histogram(
            "ferry_gateway_overhead_seconds",
            "Time the gateway added: sync total minus the provider call; async submit latency",
            ["mode"], buckets=_FINE, registry=r)
        self.queue_depth = Gauge("ferry_queue_depth", "Messages waiting in a lane's queue",
                                 ["lane"], registry=r)
        self.jobs_unfinished = Gauge("ferry_jobs_unfinished", "Async jobs by unfinished status",
                                     ["status"], registry=r)
        self.long_polls = Gauge("ferry_long_polls_waiting",
                                "Polls waiting for their job to end (x-ferry-wait)", registry=r)
        # worker
        self.jobs_finished = Counter("ferry_jobs_finished", "Requests finished by workers",
                                     ["mode", "status"], registry=r)
        self.provider_calls = Counter("ferry_provider_calls", "Provider calls by outcome",
                                      ["provider", "outcome"], registry=r)
        self.provider_retries = Counter("ferry_provider_retries",
                                        "Provider calls that were retries", ["provider"],
                                        registry=r)
        self.provider_fallbacks = Counter("ferry_provider_fallbacks",
                                          "Times a request moved on to a fallback route",
                                          ["provider"], registry=r)
        self.provider_seconds = Histogram("ferry_provider_call_seconds",
                                          "Provider call duration (streams: until first event)",
                                          ["provider"], buckets=_COARSE, registry=r)
        self.provider_rate_limited = Counter(
            "ferry_provider_rate_limited", "Provider answers of 429 (not counted as attempts)",
            ["provider"], registry=r)
        self.pace_wait_seconds = Histogram(
            "ferry_pace_wait_seconds", "Time calls waited for their slot on a paced provider key",
            ["provider"], buckets=_COARSE, registry=r)
        self.in_flight = Gauge("ferry_worker_in_flight", "Requests a worker is processing",
                               ["lane"], registry=r)
        # webhooks (labels: fixed sets, never an endpoint's name or URL)
        self.webhook_attempts = Counter(
            "ferry_webhook_attempts", "Webhook attempts by what they led to: delivered, "
            "retry (5xx, 408, 429, timeout, connection error), failed (given up)",
            ["result"], registry=r)
        self.webhook_attempt_seconds = Histogram(
            "ferry_webhook_attempt_seconds", "Time one webhook attempt took",
            buckets=_COARSE, registry=r)
        # sweeper and reconciler
        self.swept = Counter("ferry_sweeper_deleted", "Expired results deleted", registry=r)
        self.reconciled = Counter("ferry_reconciled", "Jobs the reconciler repaired, by what it "
                                  "found", ["what"], registry=r)
        self.history_pruned = Counter("ferry_history_pruned",
                                      "History rows deleted past the retention", registry=r)

        # Model labels come from configuration (aliases, providers' model lists), never from
        # what a client wrote: anything else is `other`, so no client can grow the series.
        self.known_models: set[str] = set()
        self._children: dict[tuple[str, ...], Any] = {}

    def model_label(self, model: str | None) -> str:
        if not model:
            return "none"
        return model if model in self.known_models else "other"

    def answered(self, mode: str, model: str | None, status: int, elapsed_s: float,
                 overhead_s: float | None) -> None:
        """One request answered by the api. The labelled series are looked up once per label
        set (labels() takes a lock and builds its key on every call, on every request);
        the label sets are bounded: modes, model labels and statuses."""
        label = self.model_label(model)
        key = (mode, label, str(status))
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (
                self.requests.labels(*key), self.request_seconds.labels(mode),
                self.overhead_seconds.labels(mode))
        children[0].inc()
        children[1].observe(elapsed_s)
        if overhead_s is not None:
            children[2].observe(overhead_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)


METRICS_PORT_TRIES = 32


@contextlib.asynccontextmanager
async def metrics_server(settings: Settings, metrics: Metrics) -> AsyncIterator[int | None]:
    """`/metrics` on this process's own port: FERRY_METRICS_PORT, or the next free one after
    it, so several processes on one host just work (0 turns it off). Yields the port."""
    if not settings.metrics_port:
        yield None
        return

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    app = web.Application()
    app.router.add_get("/metrics", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = None
    for candidate in range(settings.metrics_port, settings.metrics_port + METRICS_PORT_TRIES):
        try:
            await web.TCPSite(runner, settings.metrics_host, candidate).start()
        except OSError:
            continue
        port = candidate
        break
    if port is None:
        log.warning("no free metrics port; /metrics is off for this process",
                    tried=f"{settings.metrics_port}-"
                          f"{settings.metrics_port + METRICS_PORT_TRIES - 1}")
    else:
        log.info("metrics served", port=port)
    try:
        yield port
    finally:
        await runner.cleanup()
