"""Pacing each provider key to the rate its provider allows, shared by every worker.

What a key allows is learned from the provider's own answers: Anthropic's
`anthropic-ratelimit-requests-{limit,remaining}` (the OpenAI adapter translates
`x-ratelimit-*-requests` into the same names), whose limit is per minute; and a 429's
`retry-after`. The providers file may also set `rpm` and `tpm` per key (the lower of the
configured and the learned rate wins) and `max_concurrency` (calls in flight over all workers:
a lease row per call in `provider_leases`; a stream holds its place until its last event).

A key is paced only while it needs to be ("engaged"): once fewer requests remain than
ENGAGE_SECONDS of its rate, after a 429, or always when the providers file sets a limit. A
key with plenty left pays nothing. An engaged key's calls take slots from one row per key in
PostgreSQL (`provider_pace`, migration 0007), reserved by the generic cell rate algorithm:
the slots of concurrent calls in one worker are reserved together in one statement, so all
workers together stay at the rate, however many there are. A slot further off than the
caller's horizon is not reserved: the caller is told when to come back (`Saturated`), and an
async job goes to a delay queue for that long, a sync request gets a 429.

The first call on a key nobody has paced yet goes alone (a probe), so that a cold start does
not fire a whole prefetch at a provider whose limit is unknown; the others wait for its answer
(at most PROBE_WAIT_S, 0.5 s). While the database is away, each worker paces on its own at the
learned rate.

Tokens: for a key with a token limit (`tpm`, or learned from `anthropic-ratelimit-tokens-*`
when few remain), each answer's usage pushes the key's next slot out by the time those tokens
take at that rate (streams are not debited: their usage is known only at the end).
"""

from __future__ import annotations

import asyncio
import functools
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from shared.errors import Unavailable
from shared.logging import get_logger
from shared.metrics import Metrics
from shared.pacestore import PaceStore, Reservation, key_fingerprint
from worker.providers.base import Headers

log = get_logger("ferry.pacing")

ENGAGE_SECONDS = 2.0  # pace a key once fewer requests than this many seconds' worth remain
SAFETY = 0.97  # pace a little under the limit: clocks and networks jitter
PROBE_WAIT_S = 0.5  # a slow first answer holds the others back no longer than this
DEFAULT_WAIT_S = 1.0  # a 429 without retry-after


@dataclass(frozen=True, slots=True)
class KeyLimits:
    """What the providers file says of a key."""

    rpm: float | None = None
    tpm: float | None = None
    max_concurrency: int | None = None

    @property
    def configured(self) -> bool:
        return self.rpm is not None or self.tpm is not None


class Saturated(Exception):
    """The key has no free slot within the caller's horizon; the next is `wait_s` away."""

    def __init__(self, wait_s: float) -> None:
        super().__init__(f"next free slot in {wait_s:.2f} s")
        self.wait_s = wait_s


def read_limits(headers: Headers, kind: str = "requests") -> tuple[int, int] | None:
    """(limit per minute, remaining) from `anthropic-ratelimit-{kind}-*`, if both are there."""
    limit = remaining = None
    for name, value in headers:
        if name == f"anthropic-ratelimit-{kind}-limit":
            limit = value
        elif name == f"anthropic-ratelimit-{kind}-remaining":
            remaining = value
    try:
        return (int(limit), int(remaining)) if limit and remaining else None
    except ValueError:
        return None


@dataclass
class _Key:
    provider: str
    fingerprint: str
    limits: KeyLimits
    rate: float | None = None  # requests per second to pace at (None: unknown)
    token_rate: float | None = None  # tokens per second (None: no token limit known)
    engaged: bool = False
    tokens_engaged: bool = False
    seen: bool = False  # some answer came back (with or without rate-limit headers)
    probe: asyncio.Future[None] | None = None
    blocked_until: float = 0.0  # monotonic; from a 429 this worker saw
    local_tat: float = 0.0  # monotonic; pacing on our own while the database is away
    tat: float = 0.0  # monotonic; the key's next free slot as of this worker's last reservation
    reserving: int = 0  # calls whose slots are being reserved right now
    waiting: list[tuple[asyncio.Future[float], float]] = field(default_factory=list)
    flusher: asyncio.Task[None] | None = None
    concurrency: asyncio.Semaphore | None = None

    def __post_init__(self) -> None:
        if self.limits.rpm is not None:
            self.rate = self.limits.rpm / 60
            self.engaged = True
        if self.limits.tpm is not None:
            self.token_rate = self.limits.tpm / 60
            self.tokens_engaged = True
        if self.limits.max_concurrency is not None:
            self.concurrency = asyncio.Semaphore(self.limits.max_concurrency)

    @property
    def interval_s(self) -> float:
        return 1 / (self.rate * SAFETY) if self.rate else 0.001


Release = Callable[[], Coroutine[Any, Any, None]]


class Slot:
    """One call's turn on a key: report what the provider answered through it. A call with a
    place among the key's `max_concurrency` gives it back when the `with` ends, unless it
    `keep()`s it (a stream, which stays in flight until its last event)."""

    def __init__(self, pacer: Pacer, key: _Key, release: Release | None) -> None:
        self._pacer = pacer
        self._key = key
        self._release = release

    def answered(self, headers: Headers, status: int | None = None,
                 retry_after: float | None = None, tokens: int | None = None) -> None:
        self._pacer._learn(self._key, headers, status, retry_after, tokens)

    @property
    def holds_place(self) -> bool:
        return self._release is not None

    def keep(self) -> Callable[[], None]:
        """Hold the place in flight past the `with`; call what this returns to give it back."""
        release, self._release = self._release, None
        return lambda: self._pacer._background(release()) if release is not None else None

    async def _end(self) -> None:
        if self._release is not None:
            release, self._release = self._release, None
            await release()


class Pacer:
    """`learn=False` (FERRY_PACING=off) paces nothing: each worker only honours the
    retry-after of the 429s it got itself, as Ferry did before pacing."""

    def __init__(self, store: PaceStore | None, limits: Mapping[tuple[str, str], KeyLimits]
                 | None = None, metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.monotonic, learn: bool = True,
                 lease_s: float = 660.0) -> None:
        self._learning = learn
        self._lease_s = lease_s  # a place in flight outlives a worker that died holding it
        self._store = store if learn else None
        self._limits = dict(limits or {}) if learn else {}
        self._metrics = metrics or Metrics()
        self._clock = clock
        self._keys: dict[tuple[str, str], _Key] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def _key(self, provider: str, key: str | None) -> _Key:
        found = self._keys.get((provider, key or ""))
        if found is None:
            found = _Key(provider, key_fingerprint(key),
                         self._limits.get((provider, key or ""), KeyLimits()))
            self._keys[(provider, key or "")] = found
        return found

    def rate(self, provider: str, key: str | None) -> float | None:
        """The requests per second a key is known to allow (for weighting keys)."""
        return self._key(provider, key).rate

    def soonest(self, provider: str, key: str | None) -> float | None:
        """Seconds until a call on this key would get its turn, as far as this worker knows:
        the key's next free slot at its last reservation, after the calls of this worker
        already waiting on it. None for a key nothing is known of and no call is probing
        (the next call on it should be the probe); 0 for a key with room, or whose probe is
        slow to answer (as `slot` lets calls go on unpaced then)."""
        state = self._key(provider, key)
        if self._learning and not state.seen and not state.engaged:
            return None if state.probe is None else 0.0
        now = self._clock()
        wait = max(state.blocked_until - now, 0.0)
        if state.engaged or state.tokens_engaged:
            queued = len(state.waiting) + state.reserving
            wait = max(wait, state.tat - now) + queued * state.interval_s
        return wait

    async def settle(self, provider: str, keys: Sequence[str]) -> None:
        """Before choosing among a provider's keys: when every key nothing is known of is
        being probed, wait for those first answers (at most PROBE_WAIT_S), so that a cold
        start's burst is spread by what they tell, not evenly."""
        if not self._learning:
            return
        unknown = [state for state in (self._key(provider, k) for k in keys)
                   if not state.seen and not state.engaged]
        probes = [state.probe for state in unknown if state.probe is not None]
        if probes and len(probes) == len(unknown):
            await asyncio.wait([asyncio.shield(p) for p in probes], timeout=PROBE_WAIT_S)

    @asynccontextmanager
    async def slot(self, provider: str, key: str | None, wait_max_s: float,
                   block_max_s: float | None = None) -> AsyncIterator[Slot]:
        """Wait for this call's turn on the key. Saturated if that is further off than
        `wait_max_s`, or if the provider's own retry-after keeps the key shut for longer than
        `block_max_s` (default: `wait_max_s`)."""
        state = self._key(provider, key)
        # The common case, a key with room and no limits configured, awaits nothing here.
        probing = (await self._probe(state)
                   if self._learning and not state.seen and not state.engaged else False)
        slot: Slot | None = None
        try:
            # Neither waits while holding the other: a place in flight is taken first (no
            # rate slot goes unused meanwhile), then the turn.
            release = (await self._place(state, wait_max_s)
                       if state.limits.max_concurrency is not None else None)
            slot = Slot(self, state, release)
            if not probing and (state.engaged or state.tokens_engaged
                                or state.blocked_until > self._clock()):
                await self._turn(state, wait_max_s,
                                 wait_max_s if block_max_s is None else block_max_s)
            yield slot
        finally:
            if probing:
                state.seen = True
                if state.probe is not None:
                    state.probe.set_result(None)
                    state.probe = None
            if slot is not None and slot.holds_place:
                await asyncio.shield(slot._end())

    async def _place(self, state: _Key, wait_max_s: float) -> Release | None:
        """A place among the key's `max_concurrency` calls in flight over all workers (a
        lease row each), or, while the database is away, among this worker's."""
        limit = state.limits.max_concurrency
        if limit is None:
            return None
        deadline = self._clock() + wait_max_s
        delay = 0.02
        while self._store is not None:
            try:
                lease = await self._store.acquire_lease(state.provider, state.fingerprint,
                                                        limit, self._lease_s)
            except Unavailable:
                break
            if lease is not None:
                return functools.partial(self._release_lease, lease)
            if self._clock() + delay > deadline:
                raise Saturated(delay)
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, 0.5)
        assert state.concurrency is not None
        try:
            await asyncio.wait_for(state.concurrency.acquire(),
                                   max(deadline - self._clock(), 0.0))
        except TimeoutError:
            raise Saturated(1.0) from None
        semaphore = state.concurrency

        async def release() -> None:
            semaphore.release()

        return release

    async def _release_lease(self, lease: uuid.UUID) -> None:
        assert self._store is not None
        try:
            await self._store.release_lease(lease)
        except Unavailable:
            pass  # it expires instead

    async def _probe(self, state: _Key) -> bool:
        """True when this call is the first on a key nothing is known of (the others wait for
        its answer, at most PROBE_WAIT_S)."""
        while self._learning and not state.seen and not state.engaged:
            if state.probe is None:
                state.probe = asyncio.get_running_loop().create_future()
                try:
                    interval = await self._learned(state)
                except BaseException:
                    state.probe.set_result(None)
                    state.probe = None
                    raise
                if interval is None:
                    return True
                state.rate, state.engaged, state.seen = 1 / interval / SAFETY, True, True
                state.probe.set_result(None)
                state.probe = None
                break
            try:
                await asyncio.wait_for(asyncio.shield(state.probe), PROBE_WAIT_S)
            except TimeoutError:
                break  # a slow probe: go on unpaced, as before anything was known
        return False

    async def _turn(self, state: _Key, horizon_s: float, block_max_s: float) -> None:
        """Wait for this call's slot on the key."""
        wait = max(state.blocked_until - self._clock(), 0.0)
        if wait > block_max_s:
            raise Saturated(wait)
        if state.engaged or state.tokens_engaged or wait > 0:
            wait = max(wait, await self._reserve(state, horizon_s))
        if wait > horizon_s:
            raise Saturated(wait)
        if wait > 0:
            self._metrics.pace_wait_seconds.labels(state.provider).observe(wait)
            await asyncio.sleep(wait)

    async def _learned(self, state: _Key) -> float | None:
        if self._store is None:
            return None
        try:
            return await self._store.learned(state.provider, state.fingerprint)
        except Unavailable:
            return None

    async def _reserve(self, state: _Key, horizon_s: float) -> float:
        """Seconds until this call's slot: reserved with the other calls waiting on the key."""
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        state.waiting.append((future, horizon_s))
        if state.flusher is None or state.flusher.done():
            state.flusher = asyncio.create_task(self._flush(state))
        return await future

    async def _flush(self, state: _Key) -> None:
        while state.waiting:
            batch, state.waiting = state.waiting, []
            state.reserving = len(batch)
            for horizon in sorted({h for _, h in batch}):
                group = [f for f, h in batch if h == horizon]
                interval = state.interval_s
                try:
                    reservation = await self._reserve_slots(state, interval, len(group), horizon)
                except Exception as exc:  # a bug: the callers must not hang on it
                    for future in group:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                finally:
                    state.reserving -= len(group)
                start = self._clock()
                state.tat = start + reservation.first_s + reservation.granted * interval
                for i, future in enumerate(group):
                    if future.done():
                        continue  # its caller went away; its slot goes unused
                    at = reservation.first_s + i * interval
                    if i < reservation.granted:
                        future.set_result(max(at - (self._clock() - start), 0.0))
                    else:
                        future.set_result(at)  # beyond the horizon: Saturated

    async def _reserve_slots(self, state: _Key, interval: float, wanted: int,
                             horizon: float) -> Reservation:
        if self._store is not None:
            try:
                return await self._store.reserve(state.provider, state.fingerprint, interval,
                                                 wanted, horizon)
            except Unavailable:
                pass
        # On our own: the same algorithm on this worker's clock.
        now = self._clock()
        base = max(state.local_tat, state.blocked_until, now)
        first = base - now
        granted = min(wanted, max(0, int((horizon - first) // interval) + 1))
        state.local_tat = base + granted * interval
        return Reservation(first, granted)

    def _learn(self, state: _Key, headers: Headers, status: int | None,
               retry_after: float | None, tokens: int | None) -> None:
        state.seen = True
        wait = None
        if status == 429:  # this worker holds back for the provider's retry-after, always
            wait = retry_after if retry_after is not None else DEFAULT_WAIT_S
            state.blocked_until = max(state.blocked_until, self._clock() + wait)
            self._metrics.provider_rate_limited.labels(state.provider).inc()
        if not self._learning:
            return
        configured = state.limits
        found = read_limits(headers)
        if found is not None:
            per_minute, remaining = found
            learned = per_minute / 60 if per_minute > 0 else None
            if learned is not None:
                state.rate = min(learned, configured.rpm / 60) if configured.rpm else learned
                state.engaged = (configured.rpm is not None
                                 or remaining < state.rate * ENGAGE_SECONDS)
        found_tokens = read_limits(headers, "tokens")
        if found_tokens is not None and found_tokens[0] > 0:
            per_minute, remaining = found_tokens
            learned = per_minute / 60
            state.token_rate = min(learned, configured.tpm / 60) if configured.tpm else learned
            state.tokens_engaged = (configured.tpm is not None
                                    or remaining < state.token_rate * ENGAGE_SECONDS)
        if wait is not None:  # and so do the others, and the key is paced from now on
            state.engaged = True
            self._background(self._block(state, wait))
        if tokens and state.tokens_engaged and state.token_rate:
            self._background(self._debit(state, tokens / state.token_rate))

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _block(self, state: _Key, wait_s: float) -> None:
        if self._store is None:
            return
        try:
            await self._store.block(state.provider, state.fingerprint, state.interval_s, wait_s)
        except Unavailable:
            pass  # this worker honours it; the others learn it from their own 429s

    async def _debit(self, state: _Key, seconds: float) -> None:
        state.local_tat = max(state.local_tat, self._clock()) + seconds
        if self._store is None:
            return
        try:
            await self._store.debit_tokens(state.provider, state.fingerprint, state.interval_s,
                                           seconds)
        except Unavailable:
            pass
