"""The retry policy, driven with a fake provider call and a `sleep` that only records waits."""

from __future__ import annotations

import pytest

from worker.providers.base import ProviderError
from worker.retry import Attempts, Paced, RetryLater, RetryPolicy, call_with_retries

POLICY = RetryPolicy(max_attempts=4, base_s=0.5, max_s=30.0)


class Script:
    """A provider call that fails with the given errors in turn, then answers "ok"."""

    def __init__(self, *failures: BaseException) -> None:
        self.failures = list(failures)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return "ok"


class Sleeps:
    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


def overloaded(retry_after: float | None = None) -> ProviderError:
    return ProviderError(529, None, "overloaded", retry_after=retry_after)


def rate_limited(retry_after: float | None = None) -> ProviderError:
    return ProviderError(429, None, "slow down", retry_after=retry_after)


async def test_success_first_try() -> None:
    call, sleep, attempts = Script(), Sleeps(), Attempts()
    assert await call_with_retries(POLICY, call, attempts, sleep) == "ok"
    assert attempts.count == 1 == call.calls
    assert sleep.waits == []


async def test_retryable_then_success() -> None:
    call, sleep, attempts = Script(overloaded()), Sleeps(), Attempts()
    assert await call_with_retries(POLICY, call, attempts, sleep) == "ok"
    assert attempts.count == 2 == call.calls
    assert len(sleep.waits) == 1
    assert 0 <= sleep.waits[0] <= POLICY.base_s


@pytest.mark.parametrize("error", [
    pytest.param(ProviderError(400, "invalid_request_error", "bad"), id="400"),
    pytest.param(ProviderError(401, "authentication_error", "who"), id="401"),
    pytest.param(ProviderError(502, "api_error", "not a Message", retryable=False),
                 id="explicitly_not_retryable"),
])
async def test_non_retryable_raises_at_once(error: ProviderError) -> None:
    call, sleep, attempts = Script(error, overloaded()), Sleeps(), Attempts()
    with pytest.raises(ProviderError) as info:
        await call_with_retries(POLICY, call, attempts, sleep)
    assert info.value is error
    assert attempts.count == 1 == call.calls
    assert sleep.waits == []


async def test_other_exceptions_are_not_retried() -> None:
    call, sleep, attempts = Script(RuntimeError("bug")), Sleeps(), Attempts()
    with pytest.raises(RuntimeError):
        await call_with_retries(POLICY, call, attempts, sleep)
    assert attempts.count == 1
    assert sleep.waits == []


@pytest.mark.parametrize("max_attempts", [1, 2, 4])
async def test_attempts_exhausted_raises_the_last_error(max_attempts: int) -> None:
    errors = [overloaded() for _ in range(max_attempts + 2)]
    call, sleep, attempts = Script(*errors), Sleeps(), Attempts()
    policy = RetryPolicy(max_attempts=max_attempts, base_s=0.5, max_s=30.0)
    with pytest.raises(ProviderError) as info:
        await call_with_retries(policy, call, attempts, sleep)
    assert info.value is errors[max_attempts - 1]
    assert attempts.count == max_attempts == call.calls
    assert len(sleep.waits) == max_attempts - 1


async def test_backoff_waits_stay_within_their_caps() -> None:
    call, sleep, attempts = Script(*[overloaded() for _ in range(3)]), Sleeps(), Attempts()
    assert await call_with_retries(POLICY, call, attempts, sleep) == "ok"
    assert attempts.count == 4
    assert len(sleep.waits) == 3
    for n, wait in enumerate(sleep.waits, start=1):
        assert 0 <= wait <= POLICY.base_s * 2 ** (n - 1)


@pytest.mark.parametrize("retry_after", [3.0, 0.0, 30.0], ids=["3s", "zero", "exactly_max"])
async def test_retry_after_is_honoured(retry_after: float) -> None:
    call, sleep, attempts = Script(overloaded(retry_after)), Sleeps(), Attempts()
    assert await call_with_retries(POLICY, call, attempts, sleep) == "ok"
    assert attempts.count == 2
    assert len(sleep.waits) == 1
    assert retry_after <= sleep.waits[0] <= POLICY.max_s


async def test_retry_after_beyond_max_raises_without_sleeping() -> None:
    error = overloaded(POLICY.max_s + 1)
    call, sleep, attempts = Script(error), Sleeps(), Attempts()
    with pytest.raises(ProviderError) as info:
        await call_with_retries(POLICY, call, attempts, sleep)
    assert info.value is error
    assert attempts.count == 1 == call.calls
    assert sleep.waits == []


# --- rate limits: not attempts ------------------------------------------------------------


async def test_a_rate_limit_is_not_an_attempt_and_is_not_slept_here() -> None:
    # The pacer makes the next call wait for the key (worker/pacing.py), not the retry loop.
    call, sleep, attempts = Script(rate_limited(3.0), rate_limited(1.0)), Sleeps(), Attempts()
    assert await call_with_retries(POLICY, call, attempts, sleep) == "ok"
    assert (attempts.count, attempts.limited, call.calls) == (1, 2, 3)
    assert sleep.waits == []


async def test_rate_limits_in_a_row_are_bounded() -> None:
    policy = RetryPolicy(max_attempts=4, max_rate_limited=3)
    call, attempts = Script(*(rate_limited(0.0) for _ in range(10))), Attempts()
    with pytest.raises(ProviderError) as info:
        await call_with_retries(policy, call, attempts, Sleeps())
    assert info.value.status == 429
    assert (attempts.count, attempts.limited, call.calls) == (0, 3, 3)


async def test_a_rate_limit_without_retry_after_is_final() -> None:
    spend_cap = ProviderError(429, None, "spend cap", retryable=False)
    call, attempts = Script(spend_cap), Attempts()
    with pytest.raises(ProviderError) as info:
        await call_with_retries(POLICY, call, attempts, Sleeps())
    assert info.value is spend_cap
    assert call.calls == 1


async def test_no_slot_soon_parks_an_async_job_and_refuses_a_sync_request() -> None:
    call, attempts = Script(Paced("anthropic", 42.0)), Attempts()
    with pytest.raises(RetryLater) as later:
        await call_with_retries(POLICY, call, attempts, Sleeps(), max_inline_wait=5.0)
    assert (later.value.delay, attempts.count) == (42.0, 0)
    call = Script(Paced("anthropic", 42.0))
    with pytest.raises(Paced) as refused:
        await call_with_retries(POLICY, call, Attempts(), Sleeps())
    assert (refused.value.status, refused.value.retry_after) == (429, 42.0)


# --- RetryPolicy.delay ---------------------------------------------------------------------------


@pytest.mark.parametrize("policy", [
    RetryPolicy(max_attempts=10, base_s=0.5, max_s=30.0),
    RetryPolicy(max_attempts=10, base_s=2.0, max_s=5.0),
    RetryPolicy(max_attempts=10, base_s=0.0, max_s=30.0),
], ids=["default", "low_cap", "zero_base"])
@pytest.mark.parametrize("attempt", [1, 2, 3, 5, 8, 12])
def test_delay_bounds(policy: RetryPolicy, attempt: int) -> None:
    cap = min(policy.max_s, policy.base_s * 2 ** (attempt - 1))
    samples = [policy.delay(attempt, None) for _ in range(2000)]
    assert all(0 <= d <= cap for d in samples)
    # Full jitter: spread over the whole range, not pinned to either end.
    if cap:
        assert max(samples) > 0.75 * cap
        assert min(samples) < 0.25 * cap


@pytest.mark.parametrize("retry_after", [0.0, 0.1, 3.0, 30.0])
def test_delay_with_retry_after_is_at_least_the_hint(retry_after: float) -> None:
    for attempt in (1, 3, 6):
        for _ in range(500):
            d = POLICY.delay(attempt, retry_after)
            assert retry_after <= d <= POLICY.max_s


def test_delay_with_retry_after_beyond_max_returns_the_hint() -> None:
    # call_with_retries relies on this being > max_s to give up instead of holding the slot.
    assert POLICY.delay(1, 45.0) == 45.0
