"""Job identity and the job message that travels from the api to the workers."""

from __future__ import annotations

import hashlib
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict

JOB_ID_PREFIX = "job_"

Mode = Literal["async", "sync", "stream"]
Status = Literal["pending", "processing", "completed", "failed"]


def new_job_id() -> uuid.UUID:
    return uuid.uuid4()


def format_job_id(job_id: uuid.UUID) -> str:
    return JOB_ID_PREFIX + job_id.hex


def parse_job_id(text: str) -> uuid.UUID | None:
    """The uuid inside a job id as clients see it, or None if it is not one of ours."""
    text = text.strip()
    if not text.startswith(JOB_ID_PREFIX) or len(text) != len(JOB_ID_PREFIX) + 32:
        return None
    try:
        return uuid.UUID(hex=text[len(JOB_ID_PREFIX):])
    except ValueError:
        return None


def caller_hash(api_key: str | None, authorization: str | None) -> bytes:
    """A job is bound to the credential that submitted it; only its hash is ever stored."""
    credential = api_key or ""
    if not credential and authorization:
        scheme, _, token = authorization.partition(" ")
        credential = token.strip() if scheme.lower() == "bearer" else authorization.strip()
    return hashlib.sha256(credential.encode()).digest()


class JobEnvelope(BaseModel):
    """What a worker needs to run a job. The request body travels as the raw bytes the client
    sent (already validated by the api), so unknown fields are forwarded untouched."""

    model_config = ConfigDict(frozen=True)

    job_id: uuid.UUID
    mode: Mode = "async"
    model: str
    provider: str = "anthropic"
    upstream_model: str | None = None  # the model without its provider prefix
    fallbacks: tuple[str, ...] = ()  # validated `provider/model` routes
    attempt: int = 0  # provider calls already made (a delayed retry carries it on)
    anthropic_version: str | None = None
    anthropic_beta: str | None = None
    body: bytes
    # Interactive (sync/stream) requests only: where replies go, whose request it is (for the
    # history row) and the wall-clock time after which nobody waits for it any more.
    reply_to: str | None = None
    caller_hash: bytes | None = None
    pickup_deadline: float | None = None

    @property
    def stream(self) -> bool:
        return self.mode == "stream"


class Reply(BaseModel):
    """A message from a worker back to the api process serving an interactive request."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["started", "event", "message", "error", "end"]
    body: bytes = b""
    event: str | None = None  # SSE event name, for kind == "event"
    status: int | None = None  # HTTP status, for kind == "error"
    provider_seconds: float | None = None  # time spent in provider calls (final replies)
