"""The worker's provider layer: key pools, per-provider retry policies, and fallbacks."""

from __future__ import annotations

import functools
import json
import random
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, TypeVar, cast

from shared.jobs import JobEnvelope
from shared.logging import get_logger
from shared.metrics import Metrics
from shared.providers import Route
from worker.pacing import Pacer, Saturated
from worker.providers.base import (
    CallContext,
    Provider,
    ProviderError,
    ProviderResponse,
    SSEEvent,
)
from worker.retry import Attempts, Paced, RetryLater, RetryPolicy, call_with_retries

log = get_logger("ferry.routing")

T = TypeVar("T")
SAME_TURN_S = 0.001  # keys whose next turns are this close are equally free
Operation = Callable[[Provider, bytes, CallContext], Awaitable[T]]


async def create_message(provider: Provider, body: bytes, ctx: CallContext) -> ProviderResponse:
    """The non-streaming operation, for ProviderSet.call."""
    return await provider.create_message(body, ctx)


class KeyPool:
    """Weighted choice among a provider's keys. A key answering 401/403 sits out a cool-down;
    one answering 429 sits out the provider's retry-after, so the next attempt uses another."""

    def __init__(self, keys: list[tuple[str, float]], cooldown_s: float,
                 clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None) -> None:
        self._keys = keys
        self._cooldown_s = cooldown_s
        self._clock = clock
        self._rng = rng or random.Random()
        self._until: dict[str, float] = {}

    def pick(self, soonest: Callable[[str], float | None] | None = None,
             capacity: Callable[[str], float | None] | None = None) -> str | None:
        """A key: with `soonest` (what pacing knows of each key's next free slot), the key
        whose turn comes first, or one nothing is known of yet (its first call learns its
        limit). Among keys equally free, a weighted choice: by configured weight, or, once
        `capacity` knows the rate of each (what pacing learned), by that rate."""
        if not self._keys:
            return None
        now = self._clock()
        ready = [(k, w) for k, w in self._keys if self._until.get(k, 0.0) <= now]
        if not ready:  # all cooling down: use the one that recovers first
            return min(self._keys, key=lambda kw: self._until.get(kw[0], 0.0))[0]
        if soonest is not None and len(ready) > 1:
            waits = {k: soonest(k) for k, _ in ready}
            unknown = [(k, w) for k, w in ready if waits[k] is None]
            if unknown:
                ready = unknown
            else:
                first = min(w for w in waits.values() if w is not None)
                ready = [(k, w) for k, w in ready if (waits[k] or 0.0) <= first + SAME_TURN_S]
        if len(ready) == 1:
            return ready[0][0]
        if capacity is not None:
            rates = [capacity(k) for k, _ in ready]
            if all(rates):
                ready = [(k, r) for (k, _), r in zip(ready, rates, strict=True) if r]
        keys, weights = zip(*ready, strict=True)
        return self._rng.choices(keys, weights=weights)[0]

    def names(self) -> list[str]:
        return [k for k, _ in self._keys]

    def report(self, key: str | None, exc: ProviderError) -> None:
        if key is None:
            return
        if exc.status in (401, 403):
            self._until[key] = self._clock() + self._cooldown_s
        elif exc.status == 429:
            self._until[key] = self._clock() + (exc.retry_after or 1.0)

    def has_other(self, key: str | None) -> bool:
        now = self._clock()
        return any(k != key and self._until.get(k, 0.0) <= now for k, _ in self._keys)


@dataclass(frozen=True)
class ProviderEntry:
    provider: Provider
    keys: KeyPool
    retry: RetryPolicy


def body_for_route(body: bytes, route: Route, client_model: str) -> bytes:
    """The upstream body: the client's bytes, with only the value of the top-level `model`
    replaced when the route names another model (a provider prefix or an alias)."""
    if route.model == client_model:
        return body  # the common case: forward the client's bytes untouched
    return replace_model(body, route.model)


_DECODER = json.JSONDecoder()
_WS = " \t\n\r"


def replace_model(body: bytes, model: str) -> bytes:
    """Replace the value of the top-level `model` key, leaving every other byte as it was:
    numbers beyond 64 bits, key order, escapes and spacing stay exactly the client's. Scans
    the top-level object with the standard library's scanner, which skips each value in C."""
    try:
        return _replace_model(body.decode("utf-8", "surrogatepass"), model)
    except StopIteration:  # what the scanner raises where no value starts
        raise ValueError("request body is not valid JSON") from None


def _replace_model(text: str, model: str) -> bytes:
    scan = _DECODER.scan_once  # type: ignore[attr-defined]
    i = _skip(text, 0)
    if text[i:i + 1] != "{":
        raise ValueError("request body is not a JSON object")
    i = _skip(text, i + 1)
    span: tuple[int, int] | None = None
    while text[i:i + 1] != "}":
        key, i = scan(text, i)
        i = _skip(text, i)
        if text[i:i + 1] != ":":
            raise ValueError("malformed JSON object")
        start = _skip(text, i + 1)
        _, end = scan(text, start)
        if key == "model":
            span = (start, end)  # the last one wins, as in every JSON parser
        i = _skip(text, end)
        if text[i:i + 1] == ",":
            i = _skip(text, i + 1)
    if span is None:
        raise ValueError("request body has no model")
    replaced = text[:span[0]] + json.dumps(model) + text[span[1]:]
    return replaced.encode("utf-8", "surrogatepass")


def _skip(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def parse_route(text: str) -> Route:
    provider, _, model = text.partition("/")
    return Route(provider, model)


class ProviderSet:
    def __init__(self, entries: Mapping[str, ProviderEntry],
                 metrics: Metrics | None = None, pacer: Pacer | None = None,
                 pace_horizon_s: float = 60.0) -> None:
        self._entries = entries
        self._metrics = metrics or Metrics()
        self._pacer = pacer or Pacer(None, metrics=self._metrics)
        self._pace_horizon_s = pace_horizon_s

    def routes(self, envelope: JobEnvelope) -> list[Route]:
        primary = Route(envelope.provider, envelope.upstream_model or envelope.model)
        return [primary, *(parse_route(f) for f in envelope.fallbacks)]

    async def call(self, envelope: JobEnvelope, operation: Operation[T], attempts: Attempts,
                   *, prior: int = 0, max_inline_wait: float | None = None) -> tuple[T, Route]:
        """Run `operation` on the primary route with its retry policy, then on each fallback
        while the failure is retryable. `attempts` counts calls over all routes; `prior` is
        the calls made for this job before (a delayed retry resumes its count)."""
        routes = self.routes(envelope)
        ctx = CallContext(envelope.forward_headers, envelope.query)
        for index, route in enumerate(routes):
            entry = self._entries.get(route.provider)
            if entry is None:
                raise ProviderError(400, "invalid_request_error",
                                    f"provider {route.provider!r} is not configured")
            try:
                body = body_for_route(envelope.body, route, envelope.model)
            except ValueError as exc:
                raise ProviderError(400, "invalid_request_error",
                                    f"request body: {exc}") from None
            # Only a job with a single route is parked for a long wait (its fallbacks are the
            # better use of the time otherwise); a parked job resumes its count.
            single = len(routes) == 1
            route_attempts = Attempts(prior if single else 0)
            last = index == len(routes) - 1
            try:
                inline = max_inline_wait if single else None
                result = await call_with_retries(
                    entry.retry,
                    functools.partial(self._once, route.provider, entry, operation, body, ctx,
                                      inline),
                    route_attempts, max_inline_wait=inline,
                )
                return result, route
            except RetryLater:
                raise
            except ProviderError as exc:
                if last or not exc.retryable:
                    raise
                log.info("falling back", failed=str(route), status=exc.status,
                         next=str(routes[index + 1]))
                self._metrics.provider_fallbacks.labels(route.provider).inc()
            finally:
                made = route_attempts.count - (prior if single else 0)
                attempts.count += made
                attempts.limited += route_attempts.limited
                if made > 1:
                    self._metrics.provider_retries.labels(route.provider).inc(made - 1)
        raise AssertionError("unreachable: routes is never empty")

    async def list_models(self, _requested: str | None = None) -> dict[str, list[Any]]:
        """Every provider's own model list (an unreachable provider lists nothing)."""
        out: dict[str, list[Any]] = {}
        for name, entry in self._entries.items():
            try:
                out[name] = await entry.provider.list_models(
                    CallContext(api_key=entry.keys.pick()))
            except ProviderError as exc:
                log.warning("could not list a provider's models", provider=name,
                            status=exc.status, error=exc.message)
                out[name] = []
        return out

    async def _once(self, configured: str, entry: ProviderEntry, operation: Operation[T],
                    body: bytes, ctx: CallContext, max_inline_wait: float | None) -> T:
        name = entry.provider.name
        names = entry.keys.names()
        if len(names) > 1:
            await self._pacer.settle(configured, names)
        key = entry.keys.pick(lambda k: self._pacer.soonest(configured, k),
                              lambda k: self._pacer.rate(configured, k))
        if max_inline_wait is None:  # a sync request, or a job with fallbacks to move on to
            wait_max, block_max = entry.retry.max_s, entry.retry.max_s
        else:  # an async job: a long wait for its turn is spent in a delay queue instead
            wait_max, block_max = self._pace_horizon_s, max_inline_wait
        try:
            async with self._pacer.slot(configured, key, wait_max, block_max) as slot:
                started = time.perf_counter()
                try:
                    result = await operation(entry.provider, body, replace(ctx, api_key=key))
                except ProviderError as exc:
                    slot.answered(exc.headers, exc.status, exc.retry_after)
                    raise
                stream = _opened_stream(result)
                if stream is not None:
                    slot.answered(stream[0].headers)  # its usage comes only at its end
                    if slot.holds_place:  # it stays in flight until its last event
                        result = cast(T, (stream[0], _until_closed(stream[1], slot.keep())))
                elif isinstance(result, ProviderResponse):
                    slot.answered(result.headers, tokens=_tokens(result.usage))
                else:
                    slot.answered(())
        except Saturated as full:
            paced = Paced(name, full.wait_s)
            entry.keys.report(key, paced)
            if entry.keys.has_other(key):  # another key may have room now
                raise ProviderError(429, paced.error_type, paced.message, retryable=True,
                                    retry_after=0.0) from full
            raise paced from full
        except ProviderError as exc:
            self._metrics.provider_calls.labels(name, str(exc.status)).inc()
            entry.keys.report(key, exc)
            if exc.status in (401, 403, 429) and entry.keys.has_other(key):
                # Another key may well work: try it now, not after a backoff.
                raise ProviderError(exc.status, exc.error_type, exc.message, retryable=True,
                                    retry_after=0.0) from exc
            raise
        self._metrics.provider_calls.labels(name, "ok").inc()
        self._metrics.provider_seconds.labels(name).observe(time.perf_counter() - started)
        return result


def _opened_stream(result: object
                   ) -> tuple[SSEEvent, AsyncGenerator[SSEEvent, None]] | None:
    """A stream operation's result (its first event and the rest), else None."""
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], SSEEvent):
        return result[0], result[1]
    return None


def _tokens(usage: dict[str, int]) -> int | None:
    """Tokens an answer used, for token-rate pacing (None: not known)."""
    return (usage.get("input_tokens") or 0) + (usage.get("output_tokens") or 0) or None


async def _until_closed(events: AsyncGenerator[SSEEvent, None],
                        release: Callable[[], None]) -> AsyncGenerator[SSEEvent, None]:
    try:
        async for event in events:
            yield event
    finally:
        await events.aclose()
        release()
