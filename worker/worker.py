"""The worker loop: consume jobs (and interactive requests, see interactive.py), call the
provider, store the outcome, then ack.

The job row is the truth; a message only says "look at this job". For each delivery:
1. claim the row: it becomes this worker's, with a lease the worker extends while it runs.
   A row that is finished, missing, or parked for later needs nothing: ack. A row another
   worker holds: wait until its lease runs out (that worker died) and take it over, or, if
   the lease keeps moving (it is alive), ack this duplicate.
2. call the provider within the job's deadline, then write the outcome (or park the job in a
   delay queue for a later attempt), then ack.
Store calls that fail because the database is away are retried with backoff while the message
is held: an outage never uses up a job's attempts. Attempts and take-overs are counted in the
row, not by the broker, so RabbitMQ 3.x and 4.x behave the same.

Lifecycle: prefetch = concurrency, one task per message. On SIGTERM stop taking messages, let
in-flight jobs finish within the grace period, then cancel the rest and hand them back.
"""

from __future__ import annotations

import asyncio
import os
import random
import secrets
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypeVar

import structlog
from aio_pika.abc import AbstractIncomingMessage

from shared.broker import Broker, job_envelope, message_job_id, settle
from shared.errors import Unavailable
from shared.jobs import JobEnvelope, format_job_id
from shared.logging import get_logger
from shared.metrics import Metrics
from shared.providers import Route
from shared.runtime import stop_task
from shared.settings import CONSUMER_TIMEOUT_MARGIN_S, Settings
from shared.store import Claim, Finished, Outcome, Store, StoreUnavailable
from shared.webhookstore import WebhookStore
from worker.batching import Coalescer
from worker.history import HistoryWriter
from worker.interactive import InteractiveRunner
from worker.providers.base import ProviderError, ProviderResponse
from worker.retry import Attempts, RetryLater
from worker.routing import ProviderSet, create_message
from worker.usage import TokenMeter
from worker.webhooks import WebhookSender, announce, client_session

log = get_logger("ferry.worker")

T = TypeVar("T")
Settle = Literal["ack", "nack"]

_STORE_RETRY_FIRST_S = 0.2
_STORE_RETRY_MAX_S = 5.0


def default_worker_id() -> str:
    # The suffix keeps ids unique where pids repeat (every container's worker is pid 1).
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(2)}"


@dataclass
class _Job:
    """A job this worker is running, and every delivery of it that it holds (a redelivered
    copy arriving meanwhile is settled together with the first)."""

    received: float
    messages: list[AbstractIncomingMessage]
    claimed: bool = False
    attempts: Attempts = field(default_factory=Attempts)
    task: asyncio.Task[None] | None = None


class Worker:
    def __init__(self, settings: Settings, store: Store, broker: Broker,
                 providers: ProviderSet, worker_id: str | None = None,
                 metrics: Metrics | None = None, meter: TokenMeter | None = None) -> None:
        self._settings = settings
        self._store = store
        self._broker = broker
        self._providers = providers
        self._meter = meter
        self.worker_id = worker_id or default_worker_id()
        self._tasks: set[asyncio.Task[None]] = set()
        self._jobs: dict[uuid.UUID, _Job] = {}
        self._history = HistoryWriter(store)
        self._metrics = metrics or Metrics()
        self._webhooks = WebhookStore(store)
        # Concurrent jobs claim their rows in one statement and write their outcomes in one
        # transaction (a job is acked only once its own outcome is committed).
        self._claims: Coalescer[uuid.UUID, Claim] = Coalescer(
            lambda ids: store.claim_jobs(ids, self.worker_id, settings.lease_s))
        self._finishes: Coalescer[tuple[uuid.UUID, Outcome], Finished | None] = Coalescer(
            store.finish_jobs)

    async def run(self, stop: asyncio.Event) -> None:
        s = self._settings
        structlog.contextvars.bind_contextvars(worker_id=self.worker_id)
        history_stop = asyncio.Event()
        side_tasks = {
            asyncio.create_task(self._history.run(history_stop), name="history"),
            asyncio.create_task(self._heartbeat(), name="heartbeat"),
        }
        if self._meter is not None:
            side_tasks.add(asyncio.create_task(self._meter.run(history_stop), name="meter"))
        if "async" in s.worker_lanes:
            await self._broker.consume_jobs(self._on_message, prefetch=s.worker_concurrency)
        if "batch" in s.worker_lanes:
            await self._broker.consume_batch(self._on_batch_message,
                                             prefetch=s.batch_concurrency)
        if "interactive" in s.worker_lanes:
            runner = InteractiveRunner(s, self._providers, self._history, self._broker,
                                       self.worker_id,
                                       lambda coro: self._spawn(coro, "interactive"),
                                       self._metrics, self._meter)
            await self._broker.consume_cancels(runner.on_cancel)
            await self._broker.consume_interactive(runner.on_message,
                                                   prefetch=s.interactive_concurrency)
        webhook_session = None
        if "webhooks" in s.worker_lanes:
            webhook_session = client_session(s)
            sender = WebhookSender(s, self._webhooks, self._broker, webhook_session,
                                   self.worker_id, lambda coro: self._spawn(coro, "webhooks"),
                                   self._metrics)
            await self._broker.consume_webhooks(sender.on_message,
                                                prefetch=s.webhook_concurrency)
        log.info("worker consuming", lanes=sorted(s.worker_lanes),
                 concurrency=s.worker_concurrency, interactive=s.interactive_concurrency,
                 batch=s.batch_concurrency, webhooks=s.webhook_concurrency)
        stopped = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({stopped, *side_tasks},
                                     return_when=asyncio.FIRST_COMPLETED)
        for task in done - {stopped}:  # a side task died: say why, and stop
            log.error("worker side task ended; stopping", task=task.get_name(),
                      error=repr(task.exception()) if not task.cancelled() else "cancelled")
        stopped.cancel()
        log.info("worker stopping", in_flight=len(self._tasks))
        await self._broker.stop_consuming()
        await self._drain(s.shutdown_grace_s)
        if webhook_session is not None:
            await webhook_session.close()
        history_stop.set()
        await asyncio.gather(*(task if task.get_name() in ("history", "meter") else stop_task(task)
                               for task in side_tasks), return_exceptions=True)
        log.info("worker stopped")

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
            # A task hands its job back on cancellation.
            await asyncio.gather(*(stop_task(task) for task in pending), return_exceptions=True)

    async def _heartbeat(self) -> None:
        """Extend the leases of the jobs this worker runs, every third of a lease."""
        s = self._settings
        while True:
            await asyncio.sleep(s.lease_s / 3)
            ids = [job_id for job_id, job in self._jobs.items() if job.claimed]
            if not ids:
                continue
            try:
                lost = await self._store.extend_leases(ids, self.worker_id, s.lease_s)
            except StoreUnavailable:
                log.warning("could not extend leases; the database is unavailable",
                            jobs=len(ids))
                continue
            for job_id in lost & set(self._jobs):
                log.warning("lost the lease on a running job; another worker may take it",
                            job_id=format_job_id(job_id))

    # --- one delivery ----------------------------------------------------------------------

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            envelope = job_envelope(message)
        except ValueError as exc:
            log.error("undecodable job message, dead-lettering", error=str(exc))
            await settle(message.reject(requeue=False))
            return
        self._take(envelope.job_id, message, lambda job: self._handle(job, envelope))

    async def _on_batch_message(self, message: AbstractIncomingMessage) -> None:
        """A batch request's message names the job; the request itself is read from the
        store (kept there until the job ends)."""
        try:
            job_id = message_job_id(message)
        except ValueError as exc:
            log.error("undecodable batch message, dead-lettering", error=str(exc))
            await settle(message.reject(requeue=False))
            return
        self._take(job_id, message, lambda job: self._handle_batch(job, job_id), "batch")

    def _take(self, job_id: uuid.UUID, message: AbstractIncomingMessage,
              run: Callable[[_Job], Coroutine[Any, Any, None]], lane: str = "async") -> None:
        """Run a job a message is about, unless it already runs here: then the message joins
        it (a redelivery), to be settled with it."""
        job = self._jobs.get(job_id)
        if job is not None:
            job.messages.append(message)
            return
        job = _Job(time.monotonic(), [message])
        self._jobs[job_id] = job
        job.task = self._spawn(run(job), lane)

    async def _handle_batch(self, job: _Job, job_id: uuid.UUID) -> None:
        action: Settle = "ack"
        try:
            data = await self._store_call(job, lambda: self._store.message(job_id))
            envelope = JobEnvelope.decode(job_id, data, None) if data is not None else None
        except asyncio.CancelledError:
            await asyncio.shield(self._hand_back(job, job_id))
            raise
        except Unavailable:
            envelope, action = None, "nack"
        except ValueError as exc:
            log.error("undecodable stored batch request", job_id=format_job_id(job_id),
                      error=str(exc))
            envelope = None
        if envelope is not None:
            await self._handle(job, envelope)
            return
        # Ended already (finished, canceled, expired) or unreadable: nothing to run.
        self._jobs.pop(job_id, None)
        for message in job.messages:
            await settle(message.ack() if action == "ack" else message.nack(requeue=True))

    async def _handle(self, job: _Job, envelope: JobEnvelope) -> None:
        structlog.contextvars.bind_contextvars(
            worker_id=self.worker_id, job_id=format_job_id(envelope.job_id),
            request_id=envelope.request_id)
        try:
            action = await self._process(job, envelope)
        except asyncio.CancelledError:
            await asyncio.shield(self._hand_back(job, envelope.job_id))
            raise
        except Exception:
            log.exception("job processing failed unexpectedly")
            action = await self._fail_internal(job, envelope)
        # A copy delivered from here on is handled afresh (and finds the job finished).
        self._jobs.pop(envelope.job_id, None)
        for message in job.messages:
            await settle(message.ack() if action == "ack" else message.nack(requeue=True))

    async def _process(self, job: _Job, envelope: JobEnvelope) -> Settle:
        claim = await self._claim(job, envelope)
        if claim is None:
            return "ack"
        job.claimed = True
        if claim.abandoned >= self._settings.delivery_limit:
            # Workers stopped under this job every time: it may be what kills them.
            error = ProviderError(500, "api_error", "the job was taken over from a worker that "
                                  f"stopped under it {claim.abandoned} times; giving up",
                                  retryable=False)
            await self._finish(job, envelope, _failure(error, 0, envelope.request_id))
            log.error("job failed after repeated take-overs", abandoned=claim.abandoned)
            return "ack"
        outcome = await self._call(job, envelope, claim)
        if outcome is None:
            return "ack"  # parked for a delayed retry
        if self._meter is not None:
            self._meter.record(envelope.key_id, outcome.usage)
        first = await self._finish(job, envelope, outcome)
        self._metrics.jobs_finished.labels(envelope.mode, outcome.status).inc()
        log.info("job finished", status=outcome.status, attempts=outcome.attempts,
                 http_status=outcome.http_status, provider=outcome.served_provider,
                 first=first)
        return "ack"

    async def _finish(self, job: _Job, envelope: JobEnvelope, outcome: Outcome) -> bool:
        """Write the outcome; announce the job's webhook, if it named one. Whether this call
        finished the job."""
        finished = await self._store_call(
            job, lambda: self._finishes((envelope.job_id, outcome)))
        if finished is not None and finished.delivery_id is not None:
            await announce(self._broker, self._webhooks, finished.delivery_id)
        return finished is not None

    async def _claim(self, job: _Job, envelope: JobEnvelope) -> Claim | None:
        """The claimed job, or None when this delivery needs nothing more than an ack."""
        s = self._settings
        claim = await self._store_call(
            job, lambda: self._claims(envelope.job_id))
        seen_lease = None
        while claim.state == "held":
            if seen_lease is not None and claim.lease_until != seen_lease:
                log.info("duplicate delivery: another worker is running the job",
                         holder=claim.holder)
                return None
            seen_lease = claim.lease_until
            # Its worker may be dead (the broker redelivered its message): wait for the lease
            # to run out, then take the job over.
            await asyncio.sleep(min(max(claim.lease_remaining_s, 0.0) + random.uniform(0.2, 1),
                                    s.lease_s + 1))
            claim = await self._store_call(
                job, lambda: self._claims(envelope.job_id))
        if claim.state == "missing":
            log.warning("job message without a job row (its submit was withdrawn); dropped")
        elif claim.state == "finished":
            log.info("redelivered job already finished", status=claim.status)
        elif claim.state == "parked":
            log.info("early copy of a parked job's message; dropped")
        if claim.state != "claimed":
            return None
        if claim.abandoned:
            log.warning("took over a job from a worker that stopped", abandoned=claim.abandoned)
        return claim

    async def _call(self, job: _Job, envelope: JobEnvelope, claim: Claim) -> Outcome | None:
        """The provider's answer as an outcome, or None when the job was parked."""
        outcome = await self._call_provider(job, envelope, claim)
        if outcome is not None and job.attempts.limited:
            outcome = replace(outcome, rate_limited=job.attempts.limited)
        return outcome

    async def _call_provider(self, job: _Job, envelope: JobEnvelope,
                             claim: Claim) -> Outcome | None:
        s = self._settings
        remaining = job.received + s.job_deadline_s - time.monotonic()
        try:
            async with asyncio.timeout(max(remaining, 0.0)):
                response, route = await self._providers.call(
                    envelope, create_message, job.attempts, prior=claim.attempts,
                    max_inline_wait=s.inline_retry_max_s)
        except RetryLater as later:
            # Waiting here would hold a slot for nothing: park the job in a delay queue.
            await self._park(job, envelope, later)
            return None
        except ProviderError as exc:
            log.info("provider call failed", status=exc.status, error_type=exc.error_type,
                     attempts=job.attempts.count)
            return _failure(exc, job.attempts.count, envelope.request_id)
        except TimeoutError:
            error = ProviderError(504, "timeout_error", "the job did not finish within "
                                  f"{s.job_deadline_s:g} s (FERRY_JOB_DEADLINE)")
            return _failure(error, job.attempts.count, envelope.request_id)
        return _success(response, job.attempts.count, route)

    async def _park(self, job: _Job, envelope: JobEnvelope, later: RetryLater) -> None:
        made = job.attempts.count
        await self._with_store_retry(job, lambda: self._broker.publish_delayed(envelope,
                                                                             later.delay))
        await self._store_call(job, lambda: self._store.park(
            envelope.job_id, self.worker_id, made, later.delay, job.attempts.limited))
        log.info("job parked for a delayed retry", delay_s=round(later.delay, 2),
                 status=later.status, attempts=made)

    async def _hand_back(self, job: _Job, job_id: uuid.UUID) -> None:
        """Shutdown past the grace period: the job is pending again for the next worker."""
        if job.claimed:
            try:
                await asyncio.wait_for(self._store.release(
                    job_id, self.worker_id, job.attempts.count), 5)
            except (StoreUnavailable, TimeoutError):
                pass  # its lease runs out instead
        for message in job.messages:
            await settle(message.nack(requeue=True))
        self._jobs.pop(job_id, None)
        log.info("job handed back to the queue")

    async def _fail_internal(self, job: _Job, envelope: JobEnvelope) -> Settle:
        """A bug met while running the job: fail it visibly rather than redeliver it forever."""
        error = ProviderError(500, "api_error", "internal error in the worker", retryable=False)
        try:
            finished = await asyncio.wait_for(self._store.finish_job(
                envelope.job_id, _failure(error, job.attempts.count, envelope.request_id)), 10)
        except Exception:
            log.exception("could not fail the job; handing it back")
            return "nack"
        if finished is not None and finished.delivery_id is not None:
            await announce(self._broker, self._webhooks, finished.delivery_id)
        return "ack"

    # --- retrying store (and broker) calls -------------------------------------------------

    async def _store_call(self, job: _Job, call: Callable[[], Awaitable[T]]) -> T:
        return await self._with_store_retry(job, call)

    async def _with_store_retry(self, job: _Job, call: Callable[[], Awaitable[T]]) -> T:
        """Retry while the database (or broker) is away, with backoff, until shortly before the
        broker would take the message back (its consumer timeout)."""
        s = self._settings
        deadline = job.received + s.job_deadline_s + CONSUMER_TIMEOUT_MARGIN_S / 2
        delay = _STORE_RETRY_FIRST_S
        while True:
            try:
                return await call()
            except Unavailable as exc:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("dependency unavailable; retrying", error=exc.message,
                            retry_in_s=round(delay, 2))
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, _STORE_RETRY_MAX_S)


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


def _failure(exc: ProviderError, attempts: int, request_id: str | None = None) -> Outcome:
    """A failed job's outcome; Ferry's own envelope carries the submit's request id."""
    return Outcome(status="failed", body=exc.to_json(request_id), attempts=attempts,
                   http_status=exc.status, error_type=exc.error_type)
