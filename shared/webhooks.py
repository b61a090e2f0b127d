"""Webhooks, the parts without I/O: what is sent and how it is signed (the Standard Webhooks
spec), the retry schedule, and what an endpoint's name and URL may be.

Signing is a few lines of the standard library on purpose: the tests verify it with the
`standardwebhooks` package, an implementation written by others, so a mistake here cannot
hide behind the same mistake in the check.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import random
import re
import secrets
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from typing import Literal

import orjson
from yarl import URL

from shared.jobs import Status, format_job_id

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32  # the spec asks for 24 to 64 random bytes
DELIVERY_ID_PREFIX = "msg_"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_URL_LENGTH = 2048
JITTER = 0.2  # each wait is its nominal value ± 20 %, so retries of many deliveries spread

Event = Literal["async_job.completed", "async_job.failed"]
Verdict = Literal["delivered", "retry", "failed"]


def _user_agent() -> str:
    try:
        return f"Ferry-Webhooks/{version('ferry')}"
    except PackageNotFoundError:
        return "Ferry-Webhooks"


USER_AGENT = _user_agent()


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def delivery_header_id(delivery_id: uuid.UUID) -> str:
    """The `webhook-id` of a delivery: the same on every attempt."""
    return DELIVERY_ID_PREFIX + delivery_id.hex


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """`v1,<base64 HMAC-SHA256 of "id.timestamp.body">`, keyed with the secret's bytes."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def signature_header(signing_secrets: Sequence[str], msg_id: str, timestamp: int,
                     body: bytes) -> str:
    """One signature per secret, space-separated (during a rotation: the new one, then the
    previous one; a receiver accepts the delivery if any matches)."""
    return " ".join(sign(secret, msg_id, timestamp, body) for secret in signing_secrets)


def request_headers(signing_secrets: Sequence[str], delivery_id: uuid.UUID, timestamp: int,
                    body: bytes) -> dict[str, str]:
    msg_id = delivery_header_id(delivery_id)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature_header(signing_secrets, msg_id, timestamp, body),
        "content-type": "application/json",
        "user-agent": USER_AGENT,
    }


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def event_of(status: Status) -> Event:
    return "async_job.completed" if status == "completed" else "async_job.failed"


def payload(*, job_id: uuid.UUID, status: Status, http_status: int | None, ended_at: datetime,
            expires_at: datetime, model: str, request_id: str | None,
            response: bytes | None) -> bytes:
    """The body of every attempt of a delivery, serialised once. `response`, when given, is
    the stored result (the message, or the error envelope) embedded byte for byte."""
    data: dict[str, object] = {
        "job_id": format_job_id(job_id),
        "status": status,
        "status_code": 200 if status == "completed" else (http_status or 500),
        "result_expires_at": rfc3339(expires_at),
        "model": model,
        "request_id": request_id,
    }
    if response is not None:
        data["response"] = orjson.Fragment(response)
    return orjson.dumps({"type": event_of(status), "timestamp": rfc3339(ended_at), "data": data})


# --- retries -------------------------------------------------------------------------------


def verdict(status: int | None) -> Verdict:
    """What an attempt's answer means. None: no answer (timeout, connection error)."""
    if status is None or status >= 500 or status in (408, 429):
        return "retry"
    if 200 <= status < 300:
        return "delivered"
    return "failed"  # another 4xx, or a redirect (not followed): trying again will not help


def retry_delay(failed_attempt: int, base_s: float, max_s: float,
                uniform: Callable[[float, float], float] = random.uniform) -> float:
    """The wait after attempt number `failed_attempt` (1-based) failed: base·2ⁿ⁻¹ with
    jitter, never more than `max_s`."""
    nominal = min(base_s * 2 ** min(failed_attempt - 1, 60), max_s)
    return min(nominal * uniform(1 - JITTER, 1 + JITTER), max_s)


def retry_after_s(value: str | None) -> float | None:
    """A receiver's `retry-after` in seconds (the delta form only)."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if 0 <= seconds < 86400 else None


# --- endpoints -----------------------------------------------------------------------------


def check_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(f"an endpoint name is 1 to 64 letters, digits, '_', '.' or '-', "
                         f"starting with a letter or digit; got {name[:80]!r}")
    return name


def check_url(text: str) -> str:
    """An http(s) URL with a host and no credentials in it."""
    if (len(text) > MAX_URL_LENGTH or not text.isascii() or not text.isprintable()
            or " " in text):
        raise ValueError(f"the URL must be printable ASCII without spaces, at most "
                         f"{MAX_URL_LENGTH} characters")
    try:
        url = URL(text)
    except ValueError as exc:
        raise ValueError(f"not a URL: {exc}") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError("the URL must be http:// or https:// with a host")
    if url.user or url.password:
        raise ValueError("put no credentials in the URL: receivers verify the signature")
    return text
