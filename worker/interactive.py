"""Serving sync and stream requests (and count_tokens / model listings): call the provider and
send the answer, or each stream event as it arrives, to the api process that waits for it.

Whatever a request contains, it ends in an answer to the api (a message, or an error with
Anthropic's envelope): a failure in here is never a dead task and a waiting client.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncGenerator, Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

import orjson
import structlog
from aio_pika.abc import AbstractIncomingMessage

from shared.broker import Broker, Delivery, job_envelope, settle
from shared.errors import Unavailable
from shared.jobs import JobEnvelope, Reply, format_job_id
from shared.logging import get_logger
from shared.metrics import Metrics
from shared.providers import Route
from shared.settings import Settings
from shared.store import HistoryRow
from shared.wire import ErrorEnvelope
from worker.history import HistoryWriter
from worker.providers.base import (
    RETRYABLE_STATUSES,
    CallContext,
    Headers,
    Provider,
    ProviderError,
    ProviderResponse,
    SSEEvent,
)
from worker.retry import Attempts, Paced
from worker.routing import ProviderSet, create_message
from worker.usage import TokenMeter

log = get_logger("ferry.worker")

Spawn = Callable[[Coroutine[Any, Any, None]], "asyncio.Task[None]"]
_REPLY_RECONNECT_WAIT_S = 5.0
# The api learns a worker took its request from the first reply. Most answers (a fast
# provider, an early error, a stream's first event) come sooner than this, and then say it
# themselves; a separate "started" goes out only for a request still running after it.
STARTED_AFTER_S = 0.005


class InteractiveRunner:
    def __init__(self, settings: Settings, providers: ProviderSet, history: HistoryWriter,
                 broker: Broker, worker_id: str, spawn: Spawn, metrics: Metrics,
                 meter: TokenMeter | None = None) -> None:
        self._settings = settings
        self._meter = meter
        self._providers = providers
        self._metrics = metrics
        self._history = history
        self._broker = broker
        self._worker_id = worker_id
        self._spawn = spawn
        self._running: dict[str, asyncio.Task[None]] = {}
        self._cancelled_by_client: set[str] = set()
        # Cancels for requests this worker has not started (yet): honoured on pickup.
        self._cancelled_early: dict[str, float] = {}
        # Requests not yet announced to the api: their "started" timer, then its publish.
        self._unannounced: dict[str, asyncio.TimerHandle] = {}
        self._announcing: dict[str, asyncio.Task[None]] = {}
        self._serving: set[str] = set()

    async def on_message(self, message: Delivery) -> None:
        correlation = message.correlation_id or ""
        if self._cancelled_early.pop(correlation, None) is not None:
            log.info("interactive request cancelled before it started; dropped",
                     job_id=f"job_{correlation}")
            await settle(message.ack())
            return
        task = self._spawn(self._handle(message))
        if correlation:
            self._running[correlation] = task
            task.add_done_callback(lambda _: self._running.pop(correlation, None))

    async def on_cancel(self, message: AbstractIncomingMessage) -> None:
        correlation = message.correlation_id or ""
        task = self._running.get(correlation)
        if task is not None:
            self._cancelled_by_client.add(correlation)
            task.cancel()
            return
        now = time.monotonic()
        self._cancelled_early[correlation] = now + self._settings.pickup_timeout_s + 5
        if len(self._cancelled_early) > 1000:  # forget the ones past their pickup window
            self._cancelled_early = {k: t for k, t in self._cancelled_early.items() if t > now}

    async def _handle(self, message: Delivery) -> None:
        structlog.contextvars.bind_contextvars(worker_id=self._worker_id)
        try:
            envelope = job_envelope(message)
            if envelope.reply_to is None:
                raise ValueError("interactive request without reply_to")
        except ValueError as exc:
            log.error("undecodable interactive request dropped", error=str(exc))
            await settle(message.reject(requeue=False))
            return
        structlog.contextvars.bind_contextvars(job_id=format_job_id(envelope.job_id),
                                               request_id=envelope.request_id)
        try:
            if envelope.pickup_deadline is not None and time.time() > envelope.pickup_deadline:
                log.info("interactive request expired before pickup; dropped")
            elif message.redelivered:
                # The worker that had it died; it may have sent part of the answer already.
                await self._reply(envelope, _error_reply(
                    503, "api_error", "the worker serving this request stopped; retry",
                    envelope.request_id))
            else:
                await self._serve(envelope)
        finally:
            await settle(message.ack())

    async def _serve(self, envelope: JobEnvelope) -> None:
        submitted = datetime.fromtimestamp(time.time(), UTC)
        key = envelope.job_id.hex
        self._serving.add(key)
        self._unannounced[key] = asyncio.get_running_loop().call_later(
            STARTED_AFTER_S, self._announce, envelope)
        outcome = _Outcome()
        try:
            if envelope.operation == "models":
                await self._models(envelope)
            elif envelope.stream:
                await self._stream(envelope, outcome)
            else:
                await self._once(envelope, outcome)
        except ProviderError as exc:
            outcome.fail(exc.status, exc.error_type)
            await self._reply(envelope, Reply(
                kind="error", status=exc.status, body=exc.to_json(envelope.request_id),
                provider_seconds=outcome.provider_seconds,
                headers=_error_headers(exc, outcome.attempts)))
        except asyncio.CancelledError:
            if envelope.job_id.hex in self._cancelled_by_client:
                outcome.fail(499, "client_disconnected")
                log.info("interactive request cancelled by the client")
            else:  # shutdown past the grace period: tell the api rather than go silent
                outcome.fail(503, "worker_shutdown")
                await asyncio.shield(self._reply(envelope, _error_reply(
                    503, "api_error", "the worker shut down before answering; retry",
                    envelope.request_id)))
            raise
        except Exception:
            log.exception("interactive request failed in the worker")
            outcome.fail(500, "api_error")
            await self._reply(envelope, _error_reply(500, "api_error",
                                                     "internal error in the worker",
                                                     envelope.request_id))
        finally:
            self._serving.discard(key)
            timer = self._unannounced.pop(key, None)
            if timer is not None:
                timer.cancel()
            self._cancelled_by_client.discard(envelope.job_id.hex)
            # The answer is only queued for the connection's writer, which runs once this
            # task yields: the accounting waits its turn behind it (in this task's context,
            # so the log line keeps the request's ids).
            asyncio.get_running_loop().call_soon(self._account, envelope, outcome, submitted)

    def _account(self, envelope: JobEnvelope, outcome: _Outcome, submitted: datetime) -> None:
        log.info("request served", operation=envelope.operation, mode=envelope.mode,
                 status=outcome.http_status or 200, attempts=outcome.attempts.count,
                 provider=outcome.route.provider if outcome.route else None,
                 provider_s=round(outcome.provider_seconds, 4)
                 if outcome.provider_seconds is not None else None)
        if envelope.operation == "messages":
            self._metrics.jobs_finished.labels(envelope.mode, outcome.status).inc()
            self._history.record(outcome.row(envelope, self._worker_id, submitted))
            if self._meter is not None:
                self._meter.record(envelope.key_id, outcome.usage)

    async def _once(self, envelope: JobEnvelope, outcome: _Outcome) -> None:
        operation = create_message if envelope.operation == "messages" else _count_tokens
        started = time.perf_counter()
        try:
            response, route = await self._providers.call(envelope, operation, outcome.attempts)
        finally:
            outcome.provider_seconds = time.perf_counter() - started
        outcome.served(route)
        outcome.usage, outcome.stop_reason = response.usage, response.stop_reason
        await self._reply(envelope, Reply(kind="message", body=response.body,
                                          provider_seconds=outcome.provider_seconds,
                                          headers=response.headers))

    async def _models(self, envelope: JobEnvelope) -> None:
        models = await self._providers.list_models(envelope.provider)
        await self._reply(envelope, Reply(kind="message", body=orjson.dumps(models)))

    async def _stream(self, envelope: JobEnvelope, outcome: _Outcome) -> None:
        # Retries and fallbacks happen only before the first event: after it the client has
        # output.
        (first, events), route = await self._providers.call(envelope, _open_stream,
                                                            outcome.attempts)
        outcome.served(route)
        event: SSEEvent | None = first
        try:
            while event is not None:
                outcome.observe(event)
                await self._reply(envelope, Reply(kind="event", event=event.event,
                                                  body=event.data, headers=event.headers))
                if event.event == "error":
                    break  # nothing follows an error event
                event = await anext(events, None)
        finally:
            await events.aclose()
        await self._reply(envelope, Reply(kind="end"))

    def _announce(self, envelope: JobEnvelope) -> None:
        key = envelope.job_id.hex
        if self._unannounced.pop(key, None) is None:
            return
        task = asyncio.create_task(self._send_started(envelope))
        self._announcing[key] = task
        task.add_done_callback(lambda _: self._announcing.pop(key, None))

    async def _send_started(self, envelope: JobEnvelope) -> None:
        # An api that asked for it hears "started" again every keepalive_s until the answer: it
        # takes a long silence for a worker that died with the request. Not for a stream: its
        # events, and the api's idle timeout, do that.
        again = None if envelope.stream else envelope.keepalive_s
        try:
            await self._send(envelope, Reply(kind="started", alive_s=again))
        except Exception as exc:  # the answer that follows meets the same fault, and says so
            log.warning("could not tell the api a request started", error=str(exc))
        key = envelope.job_id.hex
        if again is not None and key in self._serving:
            self._unannounced[key] = asyncio.get_running_loop().call_later(
                again, self._announce, envelope)

    async def _reply(self, envelope: JobEnvelope, reply: Reply) -> None:
        key = envelope.job_id.hex
        timer = self._unannounced.pop(key, None)
        if timer is not None:
            timer.cancel()  # this reply tells the api a worker has the request
        announcing = self._announcing.get(key)
        if announcing is not None:
            await asyncio.shield(announcing)  # "started" goes out first
        await self._send(envelope, reply)

    async def _send(self, envelope: JobEnvelope, reply: Reply) -> None:
        assert envelope.reply_to is not None
        try:
            await self._broker.publish_reply(self._broker.reply_channel(), envelope.reply_to,
                                             envelope.job_id, reply)
        except Unavailable:
            # Our connection went; on a cluster it is back on another node within moments.
            if not await self._broker.link.wait_up(_REPLY_RECONNECT_WAIT_S):
                raise
            await self._broker.publish_reply(self._broker.reply_channel(), envelope.reply_to,
                                             envelope.job_id, reply)


async def _open_stream(provider: Provider, body: bytes, ctx: CallContext
                       ) -> tuple[SSEEvent, AsyncGenerator[SSEEvent, None]]:
    events = provider.stream_message(body, ctx)
    try:
        return await events.__anext__(), events
    except StopAsyncIteration:
        raise ProviderError(502, "api_error", f"provider `{provider.name}` sent an empty stream",
                            retryable=True) from None


async def _count_tokens(provider: Provider, body: bytes, ctx: CallContext) -> ProviderResponse:
    return await provider.count_tokens(body, ctx)


def _error_reply(status: int, error_type: str, message: str,
                 request_id: str | None = None) -> Reply:
    return Reply(kind="error", status=status,
                 body=ErrorEnvelope.of(error_type, message, request_id).to_json())


def _error_headers(exc: ProviderError, attempts: Attempts) -> Headers:
    """The provider's headers, and `x-should-retry: false` where a client retry would only
    multiply calls Ferry already made, or cannot help (a spend cap). Ferry's own pacing
    refusal says when to come back."""
    headers = list(exc.headers)
    if isinstance(exc, Paced) and exc.retry_after is not None:
        headers.append(("retry-after", str(max(1, math.ceil(exc.retry_after)))))
    retryable_status = exc.status in RETRYABLE_STATUSES or exc.status >= 500
    if attempts.count + attempts.limited > 1 or (retryable_status and not exc.retryable):
        headers.append(("x-should-retry", "false"))
    return tuple(headers)


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
        if event.event not in ("message_start", "message_delta", "error"):
            return
        try:
            data = orjson.loads(event.data)
        except orjson.JSONDecodeError:
            return
        if not isinstance(data, dict):
            return
        if event.event == "message_start":
            message = data.get("message")
            usage = message.get("usage") if isinstance(message, dict) else None
            self._count(usage)
        elif event.event == "message_delta":
            delta = data.get("delta")
            reason = delta.get("stop_reason") if isinstance(delta, dict) else None
            self.stop_reason = reason if isinstance(reason, str) else self.stop_reason
            self._count(data.get("usage"))
        else:
            error = data.get("error")
            kind = error.get("type") if isinstance(error, dict) else None
            self.fail(200, kind if isinstance(kind, str) else "api_error")

    def _count(self, usage: object) -> None:
        if isinstance(usage, dict):
            self.usage.update({k: v for k, v in usage.items()
                               if isinstance(v, int) and not isinstance(v, bool)})

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
            completed_at=datetime.now(UTC), request_id=envelope.request_id,
            key_id=envelope.key_id,
        )
