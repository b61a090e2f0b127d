"""Retry policy: bounded attempts, exponential backoff with full jitter, retry-after honoured.

A rate limit (429) is not an attempt: the call did not fail, it came too early. The next call
waits for its turn on the key (worker/pacing.py holds the provider's retry-after for every
call on that key), and only `max_rate_limited` 429s in a row are taken before giving up."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from worker.providers.base import ProviderError

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 4
    base_s: float = 0.5
    max_s: float = 30.0
    max_rate_limited: int = 10

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based)."""
        backoff = random.uniform(0, min(self.max_s, self.base_s * 2 ** (attempt - 1)))
        if retry_after is not None:
            return max(retry_after, backoff) if retry_after <= self.max_s else retry_after
        return backoff


@dataclass(slots=True)
class Attempts:
    count: int = 0  # calls that count against max_attempts
    limited: int = 0  # calls answered 429 (by the provider, or by Ferry's own pacing)


class Paced(ProviderError):
    """Ferry's pacing has no slot for this call on its key soon enough: a 429 of our own,
    `retry_after` saying when the key has room again. No call was made."""

    def __init__(self, provider: str, wait_s: float) -> None:
        super().__init__(429, "rate_limit_error",
                         f"provider `{provider}` is at its rate limit for this key; "
                         f"retry in {wait_s:.1f} s", retryable=True, retry_after=wait_s)


class RetryLater(ProviderError):
    """The next attempt should come after `delay` seconds: too long to hold a worker slot, so
    the job goes back to the broker instead (async jobs only)."""

    def __init__(self, cause: ProviderError, delay: float) -> None:
        super().__init__(cause.status, cause.error_type, cause.message, retryable=True,
                         retry_after=delay)
        self.delay = delay
        self.attempts = 0  # calls made before giving the slot up; set by the caller


async def call_with_retries(
    policy: RetryPolicy,
    call: Callable[[], Awaitable[T]],
    attempts: Attempts,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    max_inline_wait: float | None = None,
) -> T:
    """Run `call` until it succeeds, fails for good, or the attempts are used up.
    `attempts.count` says how many calls counted as attempts and `attempts.limited` how many
    were answered 429, also when it raises. A wait longer than `max_inline_wait` raises
    RetryLater instead of sleeping; so does Ferry's own pacing (`Paced`) for an async job."""
    while True:
        attempts.count += 1
        try:
            return await call()
        except Paced as exc:
            attempts.count -= 1
            if max_inline_wait is not None:  # an async job: to a delay queue, attempts intact
                raise RetryLater(exc, exc.retry_after or 0.0) from exc
            raise  # a sync request: the client hears when to come back
        except ProviderError as exc:
            if exc.status == 429 and exc.retryable:
                attempts.count -= 1
                attempts.limited += 1
                if attempts.limited >= policy.max_rate_limited:
                    raise
                continue  # the next call waits for its turn on the key
            if not exc.retryable or attempts.count >= policy.max_attempts:
                raise
            wait = policy.delay(attempts.count, exc.retry_after)
            if max_inline_wait is not None and wait > max_inline_wait:
                raise RetryLater(exc, wait) from exc
            if wait > policy.max_s:
                raise  # the provider asks for longer than we hold a slot for
        await sleep(wait)
