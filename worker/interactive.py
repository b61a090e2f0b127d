"""Serving sync and stream requests: call the provider and send the answer, or each stream
event as it arrives, to the api process that waits for it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

import orjson
import structlog
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from shared.broker import job_envelope, reply_message
from shared.jobs import JobEnvelope, Reply, format_job_id
from shared.logging import get_logger
from shared.metrics import Metrics
from shared.providers import Route
from shared.store import HistoryRow
from shared.wire import ErrorEnvelope
from worker.history import HistoryWriter
from worker.providers.base import (
    CallContext,
    Provider,
    ProviderError,
    SSEEvent,
)
from worker.retry import Attempts
from worker.routing import ProviderSet, create_message

log = get_logger("ferry.worker")

Spawn = Callable[[Coroutine[Any, Any, None]], "asyncio.Task[None]"]


class InteractiveRunner:
    def __init__(self, providers: ProviderSet, history: HistoryWriter,
                 replies: AbstractChannel, worker_id: str, spawn: Spawn,
                 metrics: Metrics) -> None:
        self._providers = providers
        self._metrics = metrics
        self._history = history
        self._replies = replies
        self._worker_id = worker_id
        self._spawn = spawn
        self._running: dict[str, asyncio.Task[None]] = {}
        self._cancelled_by_client: set[str] = set()

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        task = self._spawn(self._handle(message))
        if message.correlation_id:
            self._running[message.correlation_id] = task
            task.add_done_callback(lambda _: self._running.pop(message.correlation_id or "", None))

    async def on_cancel(self, message: AbstractIncomingMessage) -> None:
        task = self._running.get(message.correlation_id or "")
        if task is not None:
            self._cancelled_by_client.add(message.correlation_id or "")
            task.cancel()

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        structlog.contextvars.bind_contextvars(worker_id=self._worker_id)
        try:
            envelope = job_envelope(message)
            if envelope.reply_to is None:
                raise ValueError("interactive request without reply_to")
        except ValueError as exc:
            log.error("undecodable interactive request dropped", error=str(exc))
            await message.reject(requeue=False)
            return
        structlog.contextvars.bind_contextvars(job_id=format_job_id(envelope.job_id))
        try:
            if envelope.pickup_deadline is not None and time.time() > envelope.pickup_deadline:
                log.info("interactive request expired before pickup; dropped")
            elif message.redelivered:
                # The worker that had it died; it may have sent part of the answer already.
                await self._reply(envelope, _error_reply(
                    503, "api_error", "the worker serving this request stopped; retry"))
            else:
                await self._serve(envelope)
        finally:
            await message.ack()

    async def _serve(self, envelope: JobEnvelope) -> None:
        submitted = datetime.fromtimestamp(time.time(), UTC)
        await self._reply(envelope, Reply(kind="started"))
        outcome = _Outcome()
        try:
            if envelope.stream:
                await self._stream(envelope, outcome)
            else:
                started = time.perf_counter()
                try:
                    response, route = await self._providers.call(envelope, create_message,
                                                                 outcome.attempts)
                finally:
                    outcome.provider_seconds = time.perf_counter() - started
                outcome.served(route)
                outcome.usage, outcome.stop_reason = response.usage, response.stop_reason
                await self._reply(envelope, Reply(kind="message", body=response.body,
                                                  provider_seconds=outcome.provider_seconds))
        except ProviderError as exc:
            outcome.fail(exc.status, exc.error_type)
            await self._reply(envelope, Reply(kind="error", status=exc.status,
                                              body=exc.envelope().to_json(),
                                              provider_seconds=outcome.provider_seconds))
        except asyncio.CancelledError:
            if envelope.job_id.hex in self._cancelled_by_client:
                outcome.fail(499, "client_disconnected")
                log.info("interactive request cancelled by the client")
            else:  # shutdown past the grace period: tell the api rather than go silent
                outcome.fail(503, "worker_shutdown")
                await asyncio.shield(self._reply(envelope, _error_reply(
                    503, "api_error", "the worker shut down before answering; retry")))
            raise
        finally:
            self._cancelled_by_client.discard(envelope.job_id.hex)
            self._metrics.jobs_finished.labels(envelope.mode, outcome.status).inc()
            self._history.record(outcome.row(envelope, self._worker_id, submitted))

    async def _stream(self, envelope: JobEnvelope, outcome: _Outcome) -> None:
        # Retries and fallbacks happen only before the first event: after it the client has
        # output.
        (first, events), route = await self._providers.call(envelope, _open_stream,
                                                            outcome.attempts)
        outcome.served(route)
        event: SSEEvent | None = first
        while event is not None:
            outcome.observe(event)
            await self._reply(envelope, Reply(kind="event", event=event.event, body=event.data))
            if event.event == "error":
                return  # the api ends the stream after an error event
            event = await anext(events, None)
        await self._reply(envelope, Reply(kind="end"))

    async def _reply(self, envelope: JobEnvelope, reply: Reply) -> None:
        assert envelope.reply_to is not None
        await self._replies.default_exchange.publish(
            reply_message(envelope.job_id, reply), routing_key=envelope.reply_to,
            mandatory=False,
        )


async def _open_stream(provider: Provider, body: bytes,
                       ctx: CallContext) -> tuple[SSEEvent, AsyncIterator[SSEEvent]]:
    events = provider.stream_message(body, ctx).__aiter__()
    try:
        return await events.__anext__(), events
    except StopAsyncIteration:
        raise ProviderError(502, "api_error", "the provider sent an empty stream",
                            retryable=True) from None


def _error_reply(status: int, error_type: str, message: str) -> Reply:
    return Reply(kind="error", status=status,
                 body=ErrorEnvelope.of(error_type, message).to_json())


class _Outcome:
    """What the history row says about one interactive request."""

    def __init__(self) -> None:
        self.attempts = Attempts()
        self.status = "completed"
        self.http_status: int | None = None
        self.error_type: str | None = None
        self.stop_reason: str | None = None
        self.usage: dict[str, int] = {}
        self.route: Route | None = None
        self.provider_seconds: float | None = None

    def served(self, route: Route) -> None:
        self.route = route

    def fail(self, http_status: int, error_type: str) -> None:
        self.status, self.http_status, self.error_type = "failed", http_status, error_type

    def observe(self, event: SSEEvent) -> None:
        """Usage and stop reason from the stream's message_start / message_delta events."""
        if event.event == "message_start":
            usage = orjson.loads(event.data).get("message", {}).get("usage", {})
            self.usage.update({k: v for k, v in usage.items() if isinstance(v, int)})
        elif event.event == "message_delta":
            data = orjson.loads(event.data)
            self.stop_reason = data.get("delta", {}).get("stop_reason") or self.stop_reason
            usage = data.get("usage") or {}
            self.usage.update({k: v for k, v in usage.items() if isinstance(v, int)})
        elif event.event == "error":
            error = orjson.loads(event.data).get("error", {})
            self.fail(200, error.get("type", "api_error"))

    def row(self, envelope: JobEnvelope, worker_id: str, submitted: datetime) -> HistoryRow:
        return HistoryRow(
            id=envelope.job_id, caller_hash=envelope.caller_hash or b"", mode=envelope.mode,
            model=envelope.model, provider=envelope.provider, status=self.status,  # type: ignore[arg-type]
            attempts=self.attempts.count, worker_id=worker_id, http_status=self.http_status,
            error_type=self.error_type, stop_reason=self.stop_reason,
            input_tokens=self.usage.get("input_tokens"),
            output_tokens=self.usage.get("output_tokens"),
            served_provider=self.route.provider if self.route else None,
            served_model=self.route.model if self.route else None,
            upstream_model=envelope.upstream_model,
            submitted_at=submitted, started_at=submitted,
            completed_at=datetime.now(UTC),
        )
