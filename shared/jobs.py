"""Job identity, and the messages that travel between the api and the workers.

A message body is a small JSON header (Ferry's routing facts: model, route, forwarded headers)
followed by the client's request body exactly as it was sent. Nothing a client controls goes
into AMQP headers: a header frame has a size limit, and an oversized one closes the whole
connection (every other request on it with it).
"""

from __future__ import annotations

import hashlib
import struct
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import orjson

JOB_ID_PREFIX = "job_"

Mode = Literal["async", "sync", "stream", "batch"]
# canceled / expired: a batch request that never ran.
Status = Literal["pending", "processing", "completed", "failed", "canceled", "expired"]
FINAL_STATUSES = ("completed", "failed", "canceled", "expired")
# What a worker is asked to do with the body: a Messages call, a count_tokens call, or (with no
# body) list the provider's models.
Operation = Literal["messages", "count_tokens", "models"]

_LENGTH = struct.Struct(">I")


def new_job_id() -> uuid.UUID:
    return uuid.uuid4()


def format_job_id(job_id: uuid.UUID) -> str:
    return JOB_ID_PREFIX + job_id.hex


def parse_job_id(text: str) -> uuid.UUID | None:
    """The uuid inside a job id as clients see it, or None if it is not one of ours."""
    return parse_prefixed_id(text, JOB_ID_PREFIX)


def parse_prefixed_id(text: str, prefix: str) -> uuid.UUID | None:
    """The uuid inside `prefix` + 32 hex digits, or None if `text` is not that."""
    text = text.strip()
    if not text.startswith(prefix) or len(text) != len(prefix) + 32:
        return None
    try:
        return uuid.UUID(hex=text[len(prefix):])
    except ValueError:
        return None


def credential_of(api_key: str | None, authorization: str | None) -> str:
    """The credential a request presents: `x-api-key`, else the `Authorization` token."""
    credential = api_key or ""
    if not credential and authorization:
        scheme, _, token = authorization.partition(" ")
        credential = token.strip() if scheme.lower() == "bearer" else authorization.strip()
    return credential


def caller_hash(api_key: str | None, authorization: str | None) -> bytes:
    """A job is bound to the credential that submitted it; only its hash is ever stored.
    Header values arrive decoded with surrogateescape: encoding back the same way hashes the
    bytes the client sent, whatever they are."""
    credential = credential_of(api_key, authorization)
    return hashlib.sha256(credential.encode("utf-8", "surrogateescape")).digest()


def _frame(meta: dict[str, Any], body: bytes) -> bytes:
    head = orjson.dumps(meta)
    return _LENGTH.pack(len(head)) + head + body


def _unframe(data: bytes) -> tuple[dict[str, Any], bytes]:
    if len(data) < _LENGTH.size:
        raise ValueError("message too short for its header")
    (size,) = _LENGTH.unpack_from(data)
    end = _LENGTH.size + size
    if end > len(data):
        raise ValueError("message header runs past the end of the message")
    try:
        meta = orjson.loads(data[_LENGTH.size:end])
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"message header is not JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise ValueError("message header is not an object")
    return meta, data[end:]


@dataclass(frozen=True, slots=True)
class JobEnvelope:
    """What a worker needs to run a request. `body` is the client's request exactly as sent
    (the api checked only what it needs), so every field reaches the provider untouched."""

    job_id: uuid.UUID
    model: str
    body: bytes
    mode: Mode = "async"
    operation: Operation = "messages"
    provider: str = "anthropic"
    upstream_model: str | None = None  # the model as the provider knows it
    fallbacks: tuple[str, ...] = ()  # `provider/model` routes tried after the primary
    # Request headers the provider must see (anthropic-version, merged anthropic-beta, other
    # anthropic-*), and the client's query string (e.g. `beta=true`).
    forward_headers: tuple[tuple[str, str], ...] = ()
    query: str = ""
    request_id: str | None = None  # the api's id for this request, joined in the logs
    # Interactive (sync/stream) requests only: where replies go, whose request it is (for the
    # history row) and the wall-clock time after which nobody waits for it any more.
    reply_to: str | None = None
    caller_hash: bytes | None = None
    pickup_deadline: float | None = None
    key_id: uuid.UUID | None = None  # the gateway key, whose tokens the worker counts
    # Sync requests from an api that watches for a worker's silence: the worker says it is
    # still serving the request this often (an older api leaves it out, and gets no such reply).
    keepalive_s: float | None = None

    @property
    def stream(self) -> bool:
        return self.mode == "stream"

    def encode(self) -> bytes:
        meta: dict[str, Any] = {"model": self.model, "mode": self.mode}
        if self.operation != "messages":
            meta["op"] = self.operation
        if self.provider != "anthropic":
            meta["provider"] = self.provider
        if self.upstream_model is not None:
            meta["upstream"] = self.upstream_model
        if self.fallbacks:
            meta["fallbacks"] = list(self.fallbacks)
        if self.forward_headers:
            meta["headers"] = [list(h) for h in self.forward_headers]
        if self.query:
            meta["query"] = self.query
        if self.request_id:
            meta["rid"] = self.request_id
        if self.caller_hash is not None:
            meta["caller"] = self.caller_hash.hex()
        if self.pickup_deadline is not None:
            meta["deadline"] = self.pickup_deadline
        if self.key_id is not None:
            meta["key"] = self.key_id.hex
        if self.keepalive_s is not None:
            meta["alive"] = self.keepalive_s
        return _frame(meta, self.body)

    @classmethod
    def decode(cls, job_id: uuid.UUID, data: bytes, reply_to: str | None) -> JobEnvelope:
        """Raises ValueError for a message that is not a job of ours."""
        meta, body = _unframe(data)
        try:
            model = meta["model"]
            if not isinstance(model, str) or not model:
                raise ValueError("job message without a model")
            caller = meta.get("caller")
            return cls(
                job_id=job_id, model=model, body=body,
                mode=_choice(meta.get("mode", "async"), ("async", "sync", "stream", "batch")),
                operation=_choice(meta.get("op", "messages"),
                                  ("messages", "count_tokens", "models")),
                provider=str(meta.get("provider", "anthropic")),
                upstream_model=meta.get("upstream"),
                fallbacks=tuple(str(f) for f in meta.get("fallbacks", ())),
                forward_headers=tuple((str(n), str(v)) for n, v in meta.get("headers", ())),
                query=str(meta.get("query", "")),
                request_id=meta.get("rid"),
                reply_to=reply_to,
                caller_hash=bytes.fromhex(caller) if isinstance(caller, str) else None,
                pickup_deadline=(float(meta["deadline"]) if meta.get("deadline") is not None
                                 else None),
                key_id=uuid.UUID(hex=meta["key"]) if meta.get("key") else None,
                keepalive_s=_positive(meta.get("alive")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed job message: {exc}") from None

    def with_changes(self, **changes: Any) -> JobEnvelope:
        return replace(self, **changes)


def _positive(value: Any) -> float | None:
    """A keepalive interval: a positive number of seconds, else None (not asked for)."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if value > 0 else None


def _choice(value: Any, allowed: tuple[str, ...]) -> Any:
    if value not in allowed:
        raise ValueError(f"unexpected value {value!r}")
    return value


ReplyKind = Literal["started", "event", "message", "error", "end"]


@dataclass(frozen=True, slots=True)
class Reply:
    """A message from a worker back to the api process serving an interactive request."""

    kind: ReplyKind
    body: bytes = b""
    event: str | None = None  # SSE event name, for kind == "event"
    status: int | None = None  # HTTP status, for kind == "error"
    provider_seconds: float | None = None  # time spent in provider calls (final replies)
    # kind == "started": the worker repeats it this often until the answer (it was asked to).
    alive_s: float | None = None
    # Response headers for the client: the provider's request-id, rate-limit headers,
    # retry-after, x-should-retry. Sent with the first reply that carries an answer.
    headers: tuple[tuple[str, str], ...] = field(default=())

    def encode(self) -> bytes:
        meta: dict[str, Any] = {"kind": self.kind}
        if self.event is not None:
            meta["event"] = self.event
        if self.status is not None:
            meta["status"] = self.status
        if self.provider_seconds is not None:
            meta["ps"] = self.provider_seconds
        if self.alive_s is not None:
            meta["alive"] = self.alive_s
        if self.headers:
            meta["headers"] = [list(h) for h in self.headers]
        return _frame(meta, self.body)

    @classmethod
    def decode(cls, data: bytes) -> Reply:
        """Raises ValueError for a message that is not a reply of ours."""
        meta, body = _unframe(data)
        try:
            status = meta.get("status")
            seconds = meta.get("ps")
            return cls(
                kind=_choice(meta.get("kind"), ("started", "event", "message", "error", "end")),
                body=body,
                event=str(meta["event"]) if meta.get("event") is not None else None,
                status=int(status) if status is not None else None,
                provider_seconds=float(seconds) if seconds is not None else None,
                alive_s=_positive(meta.get("alive")),
                headers=tuple((str(n), str(v)) for n, v in meta.get("headers", ())),
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"malformed reply: {exc}") from None
