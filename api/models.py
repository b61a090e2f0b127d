"""GET /v1/models and /v1/models/{id}, in Anthropic's shapes.

The list is the configured aliases, the models each provider's configuration names, and each
Anthropic-type provider's own list. The api holds no provider keys, so that list is fetched by
a worker (through the interactive lane) and cached here for a few minutes; without a worker,
the configured part is still served.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import orjson

from shared.errors import InvalidRequest, NotFound
from shared.logging import get_logger
from shared.metrics import Metrics
from shared.providers import DEFAULT_PROVIDER, Providers

log = get_logger("ferry.api")

CACHE_S = 300.0
RETRY_EMPTY_S = 15.0  # after a failed fetch, try again this soon
EPOCH = datetime(2024, 1, 1, tzinfo=UTC).isoformat().replace("+00:00", "Z")

Model = dict[str, Any]
Fetch = Callable[[], Awaitable[bytes]]


class ModelCatalog:
    def __init__(self, providers: Providers, metrics: Metrics | None = None) -> None:
        self._providers = providers
        self._metrics = metrics
        self._models: list[Model] | None = None
        self._until = 0.0
        self._lock = asyncio.Lock()

    async def models(self, fetch: Fetch) -> list[Model]:
        """The catalogue, fetching providers' own lists through `fetch` when stale."""
        if self._models is not None and time.monotonic() < self._until:
            return self._models
        async with self._lock:
            if self._models is not None and time.monotonic() < self._until:
                return self._models
            fetched: dict[str, list[Any]] = {}
            try:
                data = orjson.loads(await fetch())
                if isinstance(data, dict):
                    fetched = data
                self._until = time.monotonic() + CACHE_S
            except Exception as exc:  # no worker, broker away, a bad answer: configured only
                log.warning("could not fetch the providers' model lists",
                            error=f"{type(exc).__name__}: {exc}")
                self._until = time.monotonic() + RETRY_EMPTY_S
            self._models = self._merge(fetched)
            if self._metrics is not None:  # the providers' own names are fit labels too
                self._metrics.known_models.update(m["id"] for m in self._models)
            return self._models

    def _merge(self, fetched: dict[str, list[Any]]) -> list[Model]:
        seen: set[str] = set()
        out: list[Model] = []

        def add(model_id: str, display: str | None = None, extra: Model | None = None) -> None:
            if model_id in seen:
                return
            seen.add(model_id)
            model: Model = {"type": "model", "id": model_id,
                            "display_name": display or model_id, "created_at": EPOCH}
            if extra:
                model.update({k: v for k, v in extra.items() if k not in ("id", "type")})
            out.append(model)

        for alias in self._providers.aliases.values():
            add(alias.name, alias.display_name)
        for name in self._providers.names():
            prefix = "" if name == DEFAULT_PROVIDER else f"{name}/"
            for model in fetched.get(name, []):
                if isinstance(model, dict) and isinstance(model.get("id"), str):
                    add(prefix + model["id"], model.get("display_name"), model)
            for model_id in self._providers.configs[name].models:
                add(prefix + model_id)
        return out


def page(models: list[Model], after_id: str | None, before_id: str | None,
         limit_text: str | None) -> dict[str, Any]:
    """Anthropic's list pagination: `after_id` / `before_id` cursors and a `limit`."""
    try:
        limit = int(limit_text) if limit_text is not None else 20
    except ValueError:
        raise InvalidRequest(f"limit: must be an integer, got {str(limit_text)[:20]!r}"
                             ) from None
    if not 1 <= limit <= 1000:
        raise InvalidRequest("limit: must be between 1 and 1000")
    if after_id is not None and before_id is not None:
        raise InvalidRequest("give after_id or before_id, not both")
    ids = [m["id"] for m in models]
    if after_id is not None:
        start = ids.index(after_id) + 1 if after_id in ids else len(ids)
        chosen = models[start:start + limit]
        has_more = start + limit < len(models)
    elif before_id is not None:
        end = ids.index(before_id) if before_id in ids else 0
        chosen = models[max(0, end - limit):end]
        has_more = end - limit > 0
    else:
        chosen = models[:limit]
        has_more = limit < len(models)
    return {"data": chosen, "has_more": has_more,
            "first_id": chosen[0]["id"] if chosen else None,
            "last_id": chosen[-1]["id"] if chosen else None}


def find(models: list[Model], model_id: str) -> Model:
    for model in models:
        if model["id"] == model_id:
            return model
    raise NotFound(f"model {model_id[:200]!r} not found")
