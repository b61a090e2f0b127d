"""Admission control for sync and stream requests.

Past capacity, every request admitted joins a queue, and a queue that only grows makes every
answer late: goodput collapses as requests time out after the work was spent on them. So the
front door estimates the queueing delay a new request would meet:

- before a worker answers it (the answer itself, or "started" for a request that takes
  longer): by Little's law, the requests this api published that no worker has answered yet,
  over the rate answers come at while some are waiting. It covers a wait for a free worker
  slot, for a busy worker's event loop, or in a throttled broker connection alike, and sees
  a queue grow at once, not one sojourn later;
- before its handler runs: the api's own event-loop lag (how late a timer that should fire
  every few milliseconds runs);

and refuses a new request with 529 `overloaded_error` and a `retry-after`, at the top of the
handler (before the caller is authenticated or the body read), on the CoDel rule: once a delay
has stayed above its target for a whole FERRY_ADMISSION_INTERVAL, and then while it stays
above. Each signal has its own target:

- the wait for a worker, FERRY_ADMISSION_TARGET (200 ms): about what a request admitted
  under sustained overload waits; a queue of at most FERRY_ADMISSION_MIN_QUEUE (16) requests
  is never refused on it (as CoDel never drops from a queue under one packet: refusing a
  handful of requests relieves nothing, and a slow moment of a shared machine must not refuse
  them);
- the api's event-loop lag, FERRY_ADMISSION_LAG_TARGET (200 ms): a loop that runs late is
  slow for every request alike, and lags of tens of ms come and go on a busy machine.

The wait's target is a trade an operator makes. At 3x overload, 20 ms gave the requests
admitted p50 23-114 ms where 200 ms gives about 210 ms (bench, scenario 1, runs of
2026-12-03; goodput moved from run to run with either). But a burst of a few dozen requests
on a loaded machine is then refused in part: with 20 ms, CI's hostile-input test saw 529 for
one of the 20 requests of a burst that 200 ms serves.

A burst passes (everything that arrives before a delay has stood for an interval is
admitted); an open-loop excess is refused within about an interval, after which the requests
admitted wait about the target. A closed-loop client whose connections hold more than the
target's worth of work gets some 529s while the workers stay busy. Right after a refusal
spell, a queue that stands again is refused without a new interval's grace.

Two hard limits besides: the oldest request no worker has answered waiting past
FERRY_ADMISSION_WAIT (say, no worker at all), and FERRY_ADMISSION_MAX_IN_FLIGHT requests being
served by this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable

from shared.errors import Overloaded
from shared.runtime import stop_task

RETRY_AFTER = {"retry-after": "1"}
LAG_EVERY_S = 0.005
RATE_WINDOW_S = 0.5  # the answer rate's moving average forgets at this pace


class _Standing:
    """CoDel's test for one queue: has it stood (been over its limit) for an interval?"""

    def __init__(self, interval_s: float) -> None:
        self._interval_s = interval_s
        self._since: float | None = None  # over the limit continuously since then
        self._refusing_until = float("-inf")

    def observe(self, over: bool, now: float) -> bool:
        """True while the queue is over its limit and has stood for an interval (or stands
        again within an interval of the last refusal: it is known to stand, no new grace)."""
        if not over:
            self._since = None
            return False
        if self._since is None:
            self._since = now
        if now - self._since < self._interval_s and now >= self._refusing_until:
            return False
        self._refusing_until = now + self._interval_s
        return True


class Admission:
    def __init__(self, *, target_s: float, interval_s: float, max_wait_s: float,
                 max_in_flight: int, lag_target_s: float | None = None, min_queue: int = 0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._target_s = target_s
        self._lag_target_s = target_s if lag_target_s is None else lag_target_s
        self._min_queue = min_queue
        self._max_wait_s = max_wait_s
        self._max_in_flight = max_in_flight
        self._clock = clock
        self._waiting: dict[uuid.UUID, float] = {}  # insertion order: oldest first
        self._lag_s = 0.0
        self._lag = _Standing(interval_s)
        self._queue = _Standing(interval_s)
        self._rate = 0.0  # first replies per busy second, an exponential moving average
        self._rate_busy = 0.0  # the busy clock when the rate was last updated
        self._busy_s = 0.0  # busy seconds up to the last idle spell
        self._busy_since = 0.0
        self.in_flight = 0  # admitted requests being served (the caller counts them)
        self.refused = 0

    # --- signals ---------------------------------------------------------------------------

    def lag(self, lag_s: float) -> None:
        """A sample of the event loop's lag."""
        self._lag_s = lag_s
        self._lag.observe(lag_s > self._lag_target_s, self._clock())

    def published(self, job_id: uuid.UUID) -> None:
        now = self._clock()
        if not self._waiting:
            self._busy_since = now
        self._waiting[job_id] = now

    def answered(self, job_id: uuid.UUID) -> None:
        """The worker's first reply came: counts towards the answer rate."""
        if job_id in self._waiting:
            busy = self._busy(self._clock())
            self._rate = self._rate_at(busy) + 1 / RATE_WINDOW_S
            self._rate_busy = busy
        self.settled(job_id)

    def settled(self, job_id: uuid.UUID) -> None:
        """Answered, or given up: no longer waiting."""
        if self._waiting.pop(job_id, None) is None:
            return
        now = self._clock()
        if not self._waiting:
            self._busy_s += now - self._busy_since
        self._queue.observe(self._queue_over(now), now)

    def _queue_over(self, now: float) -> bool:
        return len(self._waiting) > self._min_queue and self.delay(now) > self._target_s

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def _busy(self, now: float) -> float:
        """Seconds so far with requests waiting: the clock the answer rate runs on, so that
        it keeps what the workers managed while busy through an idle spell."""
        return self._busy_s + (now - self._busy_since if self._waiting else 0.0)

    def _rate_at(self, busy: float) -> float:
        return self._rate * math.exp(-(busy - self._rate_busy) / RATE_WINDOW_S)

    def delay(self, now: float) -> float:
        """The wait a request published now would see before a worker answers it, by Little's
        law: the requests waiting ahead of it over the rate answers come at while busy
        (before any answer, the oldest one's wait). It sees a queue grow at once."""
        if not self._waiting:
            return 0.0
        rate = self._rate_at(self._busy(now))
        if rate <= 0:
            return now - next(iter(self._waiting.values()))
        return len(self._waiting) / rate

    # --- the decision ----------------------------------------------------------------------

    def admit(self) -> None:
        """Raises Overloaded if a request arriving now should be refused."""
        now = self._clock()
        lag = self._lag.observe(self._lag_s > self._lag_target_s, now)
        queue = self._queue.observe(self._queue_over(now), now)
        oldest = next(iter(self._waiting.values()), now)
        if lag or queue or self.in_flight >= self._max_in_flight \
                or now - oldest > self._max_wait_s:
            self.refused += 1
            raise Overloaded("the workers are saturated; retry later", headers=RETRY_AFTER)

    # --- the probes ------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def probing(self) -> AsyncIterator[None]:
        """Sample the running loop's lag while the block runs."""
        task = asyncio.create_task(self._probe_lag(), name="lag probe")
        try:
            yield
        finally:
            await stop_task(task)

    async def _probe_lag(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + LAG_EVERY_S
            await asyncio.sleep(LAG_EVERY_S)
            self.lag(max(0.0, loop.time() - due))
