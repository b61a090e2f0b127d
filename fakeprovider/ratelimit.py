"""What the rate-limit headers announce, and how their times are spelled."""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

# Figures of a generous account, so clients that read the headers see plausible numbers.
NOMINAL_REQUESTS = 4000
NOMINAL_TOKENS = {"tokens": 2_400_000, "input-tokens": 2_000_000, "output-tokens": 400_000}


def presented_key(headers: Mapping[str, str]) -> str:
    """The API key of a request: `x-api-key`, else the `Authorization: Bearer` token."""
    auth = headers.get("authorization", "")
    return headers.get("x-api-key") or auth.removeprefix("Bearer ").strip()


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
