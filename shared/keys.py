"""Gateway keys: what a key is, how its secret is made and recognised, what it may do.

A secret is shown once, when the key is created; Ferry keeps only its SHA-256 and a short
prefix (so `ferry keys list` can say which key is which). Jobs belong to the key's id, so a
new secret for the same key would still see its jobs.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
import secrets
import uuid
from dataclasses import dataclass, field
from datetime import datetime

SECRET_PREFIX = "sk-ferry-"
PREFIX_CHARS = len(SECRET_PREFIX) + 6  # what `list` shows: sk-ferry-ab12cd
MIN_IMPORTED_SECRET = 16
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$")


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> bytes:
    # Header values arrive decoded with surrogateescape: hash the bytes the client sent.
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).digest()


def visible_prefix(secret: str) -> str:
    return secret[:PREFIX_CHARS]


def owner_of(key_id: uuid.UUID) -> bytes:
    """What a job row of this key is bound to (jobs.caller_hash): derived from the key's id,
    not its secret."""
    return hashlib.sha256(b"ferry-key:" + key_id.bytes).digest()


@dataclass(frozen=True, slots=True)
class Limits:
    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None
    max_pending: int | None = None


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: uuid.UUID
    name: str
    prefix: str
    created_at: datetime
    expires_at: datetime | None = None
    revoked_at: datetime | None = None
    limits: Limits = field(default_factory=Limits)
    models: tuple[str, ...] = ()  # glob patterns; empty: every model

    def allows(self, model: str) -> bool:
        return not self.models or any(fnmatch.fnmatchcase(model, p) for p in self.models)

    def problem(self, now: datetime) -> str | None:
        """Why this key cannot be used now, or None."""
        if self.revoked_at is not None:
            return f"the API key {self.name!r} was revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return f"the API key {self.name!r} expired at {self.expires_at.isoformat()}"
        return None

    @property
    def owner(self) -> bytes:
        return owner_of(self.id)


def check_name(name: str) -> str:
    if not NAME.match(name):
        raise ValueError("a key name is 1 to 100 letters, digits, '_', '.', ':' or '-', "
                         "starting with a letter or digit")
    return name


def check_models(patterns: list[str]) -> tuple[str, ...]:
    cleaned = tuple(p.strip() for p in patterns if p.strip())
    for pattern in cleaned:
        if len(pattern) > 512 or "\x00" in pattern:
            raise ValueError(f"model pattern {pattern[:50]!r} is not valid")
    return cleaned
