"""The fake's model catalogue, for `GET /v1/models` and `GET /v1/models/{id}`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fakeprovider.answer import InvalidRequest

DEFAULT_LIMIT = 20
MAX_LIMIT = 1000


@dataclass(frozen=True)
class Model:
    id: str
    display_name: str
    created_at: str  # RFC 3339

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "model",
            "display_name": self.display_name,
            "created_at": self.created_at,
        }


# Newest first, as Anthropic lists them. Made-up release dates; any model name is still
# accepted by the Messages endpoints.
MODELS: tuple[Model, ...] = (
    Model("claude-opus-4-7", "Claude Opus 4.7", "2026-04-16T00:00:00Z"),
    Model("claude-sonnet-4-6", "Claude Sonnet 4.6", "2026-02-17T00:00:00Z"),
    Model("claude-opus-4-6", "Claude Opus 4.6", "2026-02-05T00:00:00Z"),
    Model("claude-opus-4-5", "Claude Opus 4.5", "2025-11-24T00:00:00Z"),
    Model("claude-haiku-4-5", "Claude Haiku 4.5", "2025-10-15T00:00:00Z"),
    Model("claude-sonnet-4-5", "Claude Sonnet 4.5", "2025-09-29T00:00:00Z"),
)


def find(model_id: str) -> Model | None:
    return next((m for m in MODELS if m.id == model_id), None)


def page(query: Mapping[str, str]) -> dict[str, Any]:
    """One page of the list: `limit` models after `after_id`, or just before `before_id`."""
    limit = _limit(query.get("limit"))
    after, before = query.get("after_id") or None, query.get("before_id") or None
    if after and before:
        raise InvalidRequest("after_id and before_id cannot be used together")
    if before is not None:
        end = _position("before_id", before)
        start = max(0, end - limit)
        has_more = start > 0  # more models before this page
    else:
        start = 0 if after is None else _position("after_id", after) + 1
        end = min(len(MODELS), start + limit)
        has_more = end < len(MODELS)
    data = [m.to_json() for m in MODELS[start:end]]
    return {
        "data": data,
        "has_more": has_more,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }


def _limit(text: str | None) -> int:
    if text is None:
        return DEFAULT_LIMIT
    try:
        limit = int(text)
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidRequest(f"limit: must be an integer from 1 to {MAX_LIMIT}")
    return limit


def _position(name: str, model_id: str) -> int:
    for index, model in enumerate(MODELS):
        if model.id == model_id:
            return index
    raise InvalidRequest(f"{name}: unknown model id {model_id!r}")
