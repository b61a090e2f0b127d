"""Request headers: the ones forwarded to the provider, and Ferry's own."""

from __future__ import annotations

from collections.abc import Mapping

from multidict import CIMultiDictProxy

from shared.errors import InvalidRequest
from shared.settings import Settings

ASYNC = "x-bf-async"
ASYNC_ID = "x-bf-async-id"
ASYNC_TTL = "x-bf-async-job-result-ttl"
ASYNC_STATUS = "x-bf-async-status"
IDEMPOTENCY_KEY = "idempotency-key"
FALLBACKS = "x-ferry-fallbacks"
WAIT = "x-ferry-wait"
MAX_WAIT_S = 60

# Forwarded headers ride inside the job message; a bound keeps one request from bloating it.
MAX_FORWARDED_BYTES = 16 * 1024
MAX_IDEMPOTENCY_KEY = 255


def forwarded_headers(headers: CIMultiDictProxy[str]) -> tuple[tuple[str, str], ...]:
    """Every `anthropic-*` request header for the provider: `anthropic-beta` values from all
    its occurrences and comma lists merged (in order, once each), other repeated headers
    joined. Credentials are never among them."""
    merged: dict[str, list[str]] = {}
    for name, value in headers.items():
        lower = name.lower()
        if not lower.startswith("anthropic-"):
            continue
        if not value.isascii():
            raise InvalidRequest(f"header {lower}: must be ASCII text")
        values = merged.setdefault(lower, [])
        if lower == "anthropic-beta":
            for part in value.split(","):
                part = part.strip()
                if part and part not in values:
                    values.append(part)
        else:
            values.append(value.strip())
    out = tuple((name, ",".join(values) if name == "anthropic-beta" else ", ".join(values))
                for name, values in merged.items() if values)
    size = sum(len(n) + len(v) for n, v in out)
    if size > MAX_FORWARDED_BYTES:
        raise InvalidRequest(f"anthropic-* headers hold {size} bytes; at most "
                             f"{MAX_FORWARDED_BYTES}")
    return out


def fallbacks_header(headers: Mapping[str, str]) -> str | None:
    value = headers.get(FALLBACKS)
    if value is not None and (not value.isascii() or len(value) > MAX_FORWARDED_BYTES):
        raise InvalidRequest(f"{FALLBACKS} must be ASCII routes, comma-separated")
    return value


def parse_async_flag(value: str | None) -> bool:
    if value is None:
        return False
    flag = value.strip().lower()
    if flag in ("true", "1"):
        return True
    if flag in ("false", "0", ""):
        return False
    raise InvalidRequest(f"{ASYNC} must be 'true' or 'false', got {value[:50]!r}")


def parse_ttl(value: str | None, settings: Settings) -> int:
    if value is None:
        return settings.result_ttl_default_s
    try:
        ttl = int(value.strip())
    except ValueError:
        raise InvalidRequest(
            f"{ASYNC_TTL} must be a whole number of seconds, got {value[:50]!r}") from None
    if not 0 <= ttl <= settings.result_ttl_max_s:
        raise InvalidRequest(
            f"{ASYNC_TTL} must be between 0 and {settings.result_ttl_max_s} seconds, got {ttl}"
        )
    return ttl


def idempotency_key(headers: Mapping[str, str]) -> str | None:
    value = headers.get(IDEMPOTENCY_KEY)
    if value is None:
        return None
    key = value.strip()
    if not key or len(key) > MAX_IDEMPOTENCY_KEY or not key.isascii() or not key.isprintable():
        raise InvalidRequest(f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} printable "
                             "ASCII characters")
    return key


def parse_wait(value: str | None) -> float:
    """`x-ferry-wait` on a poll: seconds to wait for the job to end, 0 to 60."""
    if value is None:
        return 0.0
    try:
        seconds = float(value.strip())
    except ValueError:
        seconds = float("nan")
    if not 0 <= seconds <= MAX_WAIT_S:  # also refuses nan and inf
        raise InvalidRequest(f"{WAIT} must be a number of seconds from 0 to {MAX_WAIT_S}, "
                             f"got {value[:50]!r}")
    return seconds
