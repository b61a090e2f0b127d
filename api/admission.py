"""Admission control for sync and stream requests.

Past capacity, every request admitted joins a queue: in the api's own event loop (requests
read but not yet handled), in the interactive lane (published, no worker started it yet). A
queue that only grows turns every answer late, and goodput collapses as requests time out
after the work was spent on them. So the front door estimates the queueing delay a new
request would see, from two signals:

- the event loop's lag: how late a timer that should fire every few milliseconds runs (a
  request that arrives now waits about that long before any handler sees it);
- the age of the oldest request published that no worker has answered yet.

and refuses, at the top of the handler (before the body is read or the caller
authenticated), with 529 `overloaded_error` and a `retry-after`, on the CoDel rule: only once
the delay has stayed above FERRY_ADMISSION_TARGET for a whole FERRY_ADMISSION_INTERVAL, and
then only while it is still above the target. A burst, or a closed-loop client at
saturation whose queue is bounded by its own connections, passes the short excursions above
the target; an open-loop excess, whose queue grows, is refused within about an interval, and
the requests admitted then wait about the target. Beyond that, two hard limits: a delay past
FERRY_ADMISSION_WAIT refuses at once, and so does FERRY_ADMISSION_MAX_IN_FLIGHT requests in
flight in this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable

from shared.errors import Overloaded

RETRY_AFTER = {"retry-after": "1"}
PROBE_EVERY_S = 0.005


class Admission:
    def __init__(self, *, target_s: float, interval_s: float, max_wait_s: float,
                 max_in_flight: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._target_s = target_s
        self._interval_s = interval_s
        self._max_wait_s = max_wait_s
        self._max_in_flight = max_in_flight
        self._clock = clock
        self._waiting: dict[uuid.UUID, float] = {}  # insertion order: oldest first
        self._lag_s = 0.0
        self._above_since: float | None = None  # the delay went above the target then
        self._refusing_until = float("-inf")  # a refusal spell re-arms at once until then
        self.in_flight = 0  # admitted requests being served (the caller counts them)
        self.refused = 0

    # --- signals ---------------------------------------------------------------------------

    def lag(self, lag_s: float) -> None:
        """A sample of the event loop's lag (the probe calls it)."""
        self._lag_s = lag_s
        self._observe(self._clock())

    def published(self, job_id: uuid.UUID) -> None:
        self._waiting[job_id] = self._clock()

    def settled(self, job_id: uuid.UUID) -> None:
        """Started by a worker, answered, or given up: no longer waiting for a worker."""
        self._waiting.pop(job_id, None)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def delay(self, now: float) -> float:
        """The queueing delay a request arriving now is estimated to see."""
        oldest = next(iter(self._waiting.values()), now)
        return max(self._lag_s, now - oldest)

    # --- the decision ----------------------------------------------------------------------

    def _observe(self, now: float) -> bool:
        """Updates the CoDel state; True while the delay is a standing queue to refuse."""
        if self.delay(now) <= self._target_s:
            self._above_since = None
            return False
        if self._above_since is None:
            # Just after a refusal spell the queue is known to be standing: no grace again.
            recent = now < self._refusing_until
            self._above_since = now - self._interval_s if recent else now
        if now - self._above_since < self._interval_s:
            return False
        self._refusing_until = now + self._interval_s
        return True

    def admit(self) -> None:
        """Raises Overloaded if a request arriving now should be refused."""
        now = self._clock()
        standing = self._observe(now)
        if standing or self.in_flight >= self._max_in_flight \
                or self.delay(now) > self._max_wait_s:
            self.refused += 1
            raise Overloaded("the workers are saturated; retry later", headers=RETRY_AFTER)

    # --- the probe -------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def probing(self, every_s: float = PROBE_EVERY_S) -> AsyncIterator[None]:
        """Measure the running loop's lag every `every_s` while the block runs."""
        task = asyncio.create_task(self._probe(every_s))
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _probe(self, every_s: float) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + every_s
            await asyncio.sleep(every_s)
            self.lag(max(0.0, loop.time() - due))
