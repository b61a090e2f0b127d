"""Rate limiting like Anthropic's: a token bucket per presented API key.

Configured from the environment at start (`RateLimit.from_env`) or at run time through
`POST /_fake/config` (`RateLimit.from_json`); the `Limiter` answers, per request, whether it may
pass and what the rate-limit headers should say.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

ENV_RPS = "FAKE_PROVIDER_RPS"
ENV_BURST = "FAKE_PROVIDER_BURST"
ENV_KEY_LIMITS = "FAKE_PROVIDER_KEY_LIMITS"

# What the headers announce when a key is not limited: figures of a generous account, so
# clients that read them see plausible numbers. Tokens are never limited by the fake.
NOMINAL_REQUESTS = 4000
NOMINAL_TOKENS = {"tokens": 2_400_000, "input-tokens": 2_000_000, "output-tokens": 400_000}


class ConfigError(ValueError):
    """A rate-limit setting is malformed."""


def presented_key(headers: Mapping[str, str]) -> str:
    """The API key of a request: `x-api-key`, else the `Authorization: Bearer` token."""
    auth = headers.get("authorization", "")
    return headers.get("x-api-key") or auth.removeprefix("Bearer ").strip()


@dataclass(frozen=True)
class RateLimit:
    """`rps` for every key (None: only `keys` are limited), each key's bucket holding `burst`
    requests (default: its rate, at least 1); `keys` overrides the rate of some keys."""

    rps: float | None = None
    burst: int | None = None
    keys: dict[str, float] = field(default_factory=dict)

    def bucket(self, key: str) -> tuple[float, int] | None:
        """(refill rate per second, bucket size) for `key`, or None when it is not limited."""
        rate = self.keys.get(key, self.rps)
        if rate is None:
            return None
        return rate, self.burst or max(1, math.ceil(rate))

    def to_json(self) -> dict[str, Any]:
        return {"rps": self.rps, "burst": self.burst, "keys": dict(self.keys)}

    @classmethod
    def from_json(cls, value: Any) -> RateLimit | None:
        """From `{"rps", "burst", "keys": {key: rps}}`; None (or absent) turns limiting off."""
        if value is None:
            return None
        if not isinstance(value, dict):
            raise ConfigError("rate_limit: must be an object or null")
        unknown = sorted(set(value) - {"rps", "burst", "keys"})
        if unknown:
            raise ConfigError(f"rate_limit: unknown field {unknown[0]!r}")
        keys = value.get("keys") or {}
        if not isinstance(keys, dict):
            raise ConfigError("rate_limit.keys: must be an object of key: rps")
        rps = value.get("rps")
        burst = value.get("burst")
        return cls._checked(
            None if rps is None else _rate("rate_limit.rps", rps),
            None if burst is None else _size("rate_limit.burst", burst),
            {str(k): _rate(f"rate_limit.keys.{k}", v) for k, v in keys.items()},
        )

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> RateLimit | None:
        """From FAKE_PROVIDER_RPS, FAKE_PROVIDER_BURST, FAKE_PROVIDER_KEY_LIMITS="k1=40,k2=10"."""
        rps_text = env.get(ENV_RPS, "").strip()
        burst_text = env.get(ENV_BURST, "").strip()
        keys_text = env.get(ENV_KEY_LIMITS, "").strip()
        if not (rps_text or burst_text or keys_text):
            return None
        keys: dict[str, float] = {}
        for item in filter(None, (part.strip() for part in keys_text.split(","))):
            key, sep, rate = item.rpartition("=")  # the last `=`: keys may end in base64 padding
            if not sep or not key:
                raise ConfigError(f"{ENV_KEY_LIMITS}: {item!r} is not KEY=RPS")
            keys[key] = _rate(f"{ENV_KEY_LIMITS} {key}", _parse_number(ENV_KEY_LIMITS, rate))
        return cls._checked(
            _rate(ENV_RPS, _parse_number(ENV_RPS, rps_text)) if rps_text else None,
            _size(ENV_BURST, _parse_number(ENV_BURST, burst_text)) if burst_text else None,
            keys,
        )

    @classmethod
    def _checked(cls, rps: float | None, burst: int | None, keys: dict[str, float]) -> RateLimit:
        if rps is None and not keys:
            raise ConfigError("a rate limit needs rps, or a rate for some keys")
        return cls(rps=rps, burst=burst, keys=keys)


def _parse_number(name: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{name}: {text!r} is not a number") from None


def _rate(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(f"{name}: must be a number of requests per second > 0")
    if math.isinf(value):
        raise ConfigError(f"{name}: must be finite")
    return float(value)


def _size(name: str, value: Any) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value != int(value)
        or value < 1
    ):
        raise ConfigError(f"{name}: must be an integer >= 1")
    return int(value)


@dataclass(frozen=True)
class Allowance:
    """A bucket's answer to one request, in the terms of the rate-limit headers."""

    allowed: bool
    rate: float  # requests per second
    limit: int  # the bucket's size
    remaining: int
    # Seconds until the bucket is full again, or, when refused, until a request may pass.
    reset_after: float

    @property
    def per_minute(self) -> int:
        """The limit the headers announce: requests per minute, as Anthropic and OpenAI state
        theirs (the bucket refills at that rate; it holds `limit`)."""
        return max(1, round(self.rate * 60))

    @property
    def retry_after(self) -> int:
        return max(1, math.ceil(self.reset_after))


@dataclass
class _Bucket:
    tokens: float
    updated: float


class Limiter:
    """The buckets of the current `RateLimit`; a new configuration starts with full buckets."""

    def __init__(
        self, config: RateLimit | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self.config = config

    @property
    def config(self) -> RateLimit | None:
        return self._config

    @config.setter
    def config(self, config: RateLimit | None) -> None:
        self._config = config
        self._buckets.clear()

    def take(self, key: str) -> Allowance | None:
        """Spend one request of `key`'s bucket if it can; None when `key` is not limited."""
        return self._look(key, spend=True)

    def peek(self, key: str) -> Allowance | None:
        """The state of `key`'s bucket, spending nothing (for answers that are not limited)."""
        return self._look(key, spend=False)

    def _look(self, key: str, spend: bool) -> Allowance | None:
        shape = self._config.bucket(key) if self._config else None
        if shape is None:
            return None
        rate, size = shape
        now = self._clock()
        bucket = self._buckets.setdefault(key, _Bucket(float(size), now))
        bucket.tokens = min(size, bucket.tokens + (now - bucket.updated) * rate)
        bucket.updated = now
        if spend and bucket.tokens < 1:
            return Allowance(False, rate, size, 0, (1 - bucket.tokens) / rate)
        if spend:
            bucket.tokens -= 1
        return Allowance(True, rate, size, math.floor(bucket.tokens), (size - bucket.tokens) / rate)


def rfc3339_after(seconds: float, now: datetime | None = None) -> str:
    """The UTC time `seconds` from now, rounded up to the second (waiting until then is enough)."""
    moment = (now or datetime.now(UTC)) + timedelta(seconds=seconds)
    if moment.microsecond:
        moment = moment.replace(microsecond=0) + timedelta(seconds=1)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def duration(seconds: float) -> str:
    """OpenAI's spelling of a reset delay: `0s`, `250ms`, `1.5s`, `6m0s`."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    minutes, rest = divmod(seconds, 60)
    rest_text = f"{round(rest, 3):g}s"
    return f"{int(minutes)}m{rest_text}" if minutes else rest_text
