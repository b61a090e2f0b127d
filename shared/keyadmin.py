"""Managing gateway keys, the same for `ferry keys` and the admin API: create (the secret is
returned once, never stored), list, update, revoke, and how a key is shown (never its
secret)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from shared.keys import (
    MIN_IMPORTED_SECRET,
    KeyRecord,
    Limits,
    check_models,
    check_name,
    hash_secret,
    new_secret,
    visible_prefix,
)
from shared.keystore import KeyStore


class KeyChanges(BaseModel):
    """What may be set on a key. In an update, an absent field is left alone and `null`
    (0 on the command line) removes a limit."""

    model_config = ConfigDict(extra="forbid")

    rpm: int | None = Field(None, gt=0)
    tpm: int | None = Field(None, gt=0)
    concurrency: int | None = Field(None, gt=0)
    max_pending: int | None = Field(None, gt=0)
    models: list[str] | None = None
    expires_in_days: float | None = Field(None, gt=0)


class NewKey(KeyChanges):
    name: str
    secret: str | None = Field(None, min_length=MIN_IMPORTED_SECRET, max_length=512)


async def create_key(keystore: KeyStore, spec: NewKey) -> tuple[KeyRecord, str]:
    """The new key and its secret (shown once). `spec.secret` imports an existing secret
    (a key moved over from another gateway); otherwise one is generated."""
    name = check_name(spec.name)
    secret = spec.secret or new_secret()
    if not secret.isascii() or not secret.isprintable() or " " in secret:
        raise ValueError("a key secret is printable ASCII without spaces")
    limits = Limits(spec.rpm, spec.tpm, spec.concurrency, spec.max_pending)
    record = await keystore.create(name, hash_secret(secret), visible_prefix(secret), limits,
                                   check_models(spec.models or []),
                                   _expiry(spec.expires_in_days))
    return record, secret


async def update_key(keystore: KeyStore, name: str, changes: KeyChanges,
                     given: set[str]) -> KeyRecord:
    """Apply the fields in `given` (those the caller actually set)."""
    values: dict[str, Any] = {}
    for field in given:
        value = getattr(changes, field)
        if field == "models":
            values["models"] = check_models(value or [])
        elif field == "expires_in_days":
            values["expires_at"] = _expiry(value)
        else:
            values[field] = value
    return await keystore.update(name, values)


def view(record: KeyRecord) -> dict[str, Any]:
    return {
        "id": str(record.id), "name": record.name, "prefix": record.prefix,
        "created_at": _time(record.created_at), "expires_at": _time(record.expires_at),
        "revoked_at": _time(record.revoked_at),
        "limits": {"rpm": record.limits.rpm, "tpm": record.limits.tpm,
                   "concurrency": record.limits.concurrency,
                   "max_pending": record.limits.max_pending},
        "models": list(record.models),
        "status": record.problem(datetime.now(UTC)) and (
            "revoked" if record.revoked_at else "expired") or "active",
    }


def _expiry(days: float | None) -> datetime | None:
    return datetime.now(UTC) + timedelta(days=days) if days is not None else None


def _time(moment: datetime | None) -> str | None:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z") if moment else None
