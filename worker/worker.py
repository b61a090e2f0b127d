"""The worker loop: consume jobs (and interactive requests, see interactive.py), call the
provider, store the outcome, then ack.

Lifecycle: prefetch = concurrency, one task per message. On SIGTERM stop taking messages, let
in-flight calls finish within the grace period, then cancel the rest and nack them so another
worker gets them. A message is acked only after its outcome is committed.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
from collections.abc import Coroutine
from typing import Any

import aio_pika
import structlog
from aio_pika.abc import AbstractIncomingMessage

from shared.broker import Broker, job_envelope
from shared.jobs import JobEnvelope, format_job_id
from shared.logging import get_logger
from shared.metrics import Metrics
from shared.providers import Route
from shared.settings import Settings
from shared.store import Outcome, Store
from worker.history import HistoryWriter
from worker.interactive import InteractiveRunner
from worker.providers.base import ProviderError, ProviderResponse
from worker.retry import Attempts, RetryLater
from worker.routing import ProviderSet, create_message

log = get_logger("ferry.worker")

# The api commits the job row right after the broker confirms the message, so a fast worker
# can see the message before the row: look again briefly before calling it an orphan.
_MISSING_ROW_WAITS = (0.05, 0.2, 0.5, 1.0)


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Worker:
    def __init__(self, settings: Settings, store: Store, broker: Broker,
                 providers: ProviderSet, worker_id: str | None = None,
                 metrics: Metrics | None = None) -> None:
        self._settings = settings
        self._store = store
        self._broker = broker
        self._providers = providers
        self.worker_id = worker_id or default_worker_id()
        self._tasks: set[asyncio.Task[None]] = set()
        self._history = HistoryWriter(store)
        self._metrics = metrics or Metrics()

    async def run(self, stop: asyncio.Event) -> None:
        s = self._settings
        consumers = []
        history_stop = asyncio.Event()
        history_task = asyncio.create_task(self._history.run(history_stop))
        if "async" in s.worker_lanes:
            consumers.append(await self._broker.consume_jobs(
                self._on_message, prefetch=s.worker_concurrency))
        if "interactive" in s.worker_lanes:
            runner = InteractiveRunner(self._providers, self._history,
                                       await self._broker.reply_channel(), self.worker_id,
                                       lambda coro: self._spawn(coro, "interactive"),
                                       self._metrics)
            await self._broker.consume_cancels(runner.on_cancel)
            consumers.append(await self._broker.consume_interactive(
                runner.on_message, prefetch=s.interactive_concurrency))
        log.info("worker consuming", worker_id=self.worker_id,
                 queues=[queue.name for queue, _ in consumers],
                 concurrency=s.worker_concurrency, interactive=s.interactive_concurrency)
        await stop.wait()
        log.info("worker stopping", worker_id=self.worker_id, in_flight=len(self._tasks))
        for queue, tag in consumers:
            await queue.cancel(tag)
        await self._drain(s.shutdown_grace_s)
        history_stop.set()
        await history_task
        log.info("worker stopped", worker_id=self.worker_id)

    def _spawn(self, coro: Coroutine[Any, Any, None], lane: str = "async") -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        gauge = self._metrics.in_flight.labels(lane)
        gauge.inc()
        def done(finished: asyncio.Task[None]) -> None:
            self._tasks.discard(finished)
            gauge.dec()

        task.add_done_callback(done)
        return task

    async def _drain(self, grace_s: float) -> None:
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace_s)
            for task in pending:
                task.cancel()  # the task nacks its message on cancellation
            if pending:
                await asyncio.wait(pending)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self._spawn(self._handle(message))

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        structlog.contextvars.bind_contextvars(worker_id=self.worker_id)
        try:
            envelope = job_envelope(message)
        except ValueError as exc:
            log.error("undecodable job message, dead-lettering", error=str(exc))
            await message.reject(requeue=False)
            return
        structlog.contextvars.bind_contextvars(job_id=format_job_id(envelope.job_id))
        try:
            await self._process(message, envelope)
        except asyncio.CancelledError:
            await _settle(message.nack(requeue=True))
            log.info("job handed back to the queue")
            raise
        except Exception:
            # The store or broker failed under us: give it a moment, then let the queue
            # redeliver; x-delivery-limit bounds how often.
            log.exception("job processing failed; requeueing")
            await asyncio.sleep(random.uniform(0.5, 2.0))
            await _settle(message.nack(requeue=True))

    async def _process(self, message: AbstractIncomingMessage, envelope: JobEnvelope) -> None:
        claim = await self._store.claim(envelope.job_id, self.worker_id)
        for wait in _MISSING_ROW_WAITS:
            if claim is not None:
                break
            await asyncio.sleep(wait)
            claim = await self._store.claim(envelope.job_id, self.worker_id)
        if claim is None:
            log.warning("job message without a job row (submit was rolled back); dead-lettering")
            await message.reject(requeue=False)
            return
        if claim.status in ("completed", "failed"):
            log.info("redelivered job already finished", status=claim.status)
            await message.ack()
            return
        returned = _times_returned(message)
        if returned >= self._settings.delivery_limit - 1:
            # Workers died or were stopped under this job every time: it may be what kills
            # them. Fail it visibly before the broker dead-letters it with the row stuck in
            # `processing`. (A delayed retry is a new message: it does not count here.)
            error = ProviderError(500, "api_error", f"the job was picked up {returned + 1}"
                                  " times without finishing; giving up", retryable=False)
            await self._store.finish(envelope.job_id, _failure(error, attempts=0))
            await message.ack()
            log.error("job failed after repeated deliveries", deliveries=returned + 1)
            return

        try:
            outcome = await self._call(envelope)
        except RetryLater as later:
            # Waiting here would hold a slot for nothing: park the job in a delay queue.
            await self._broker.publish_delayed(
                envelope.model_copy(update={"attempt": envelope.attempt + later.attempts}),
                later.delay,
            )
            await self._store.release(envelope.job_id, later.attempts)
            await message.ack()
            log.info("job parked for a delayed retry", delay_s=round(later.delay, 2),
                     status=later.status)
            return
        finished = await self._store.finish(envelope.job_id, outcome)
        await message.ack()
        self._metrics.jobs_finished.labels("async", outcome.status).inc()
        log.info("job finished", status=outcome.status, attempts=outcome.attempts,
                 http_status=outcome.http_status, first=finished)

    async def _call(self, envelope: JobEnvelope) -> Outcome:
        attempts = Attempts()
        try:
            response, route = await self._providers.call(
                envelope, create_message, attempts,
                max_inline_wait=self._settings.inline_retry_max_s,
            )
        except RetryLater as later:
            later.attempts = attempts.count
            raise
        except ProviderError as exc:
            log.info("provider call failed", status=exc.status, error_type=exc.error_type,
                     attempts=attempts.count)
            return _failure(exc, attempts.count)
        return _success(response, attempts.count, route)


def _success(response: ProviderResponse, attempts: int, route: Route) -> Outcome:
    usage = response.usage
    return Outcome(
        status="completed", body=response.body, attempts=attempts,
        served_provider=route.provider, served_model=route.model,
        stop_reason=response.stop_reason,
        input_tokens=usage.get("input_tokens"), output_tokens=usage.get("output_tokens"),
        cache_creation_input_tokens=usage.get("cache_creation_input_tokens"),
        cache_read_input_tokens=usage.get("cache_read_input_tokens"),
    )


def _failure(exc: ProviderError, attempts: int) -> Outcome:
    return Outcome(status="failed", body=exc.envelope().to_json(), attempts=attempts,
                   http_status=exc.status, error_type=exc.error_type)


def _times_returned(message: AbstractIncomingMessage) -> int:
    """How often the broker got this message back unacked (quorum queues count it)."""
    count = (message.headers or {}).get("x-delivery-count", 0)
    return count if isinstance(count, int) else 0


async def _settle(action: object) -> None:
    """Ack/nack on a channel that may already be closed (the broker then redelivers anyway)."""
    try:
        await action  # type: ignore[misc]
    except (aio_pika.exceptions.AMQPError, aio_pika.exceptions.ChannelInvalidStateError,
            ConnectionError, RuntimeError) as exc:
        log.warning("could not settle message; the broker will redeliver it", error=str(exc))
