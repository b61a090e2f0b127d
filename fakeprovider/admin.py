"""The test-facing endpoints: `/_fake/calls`, `/_fake/config`, `/_fake/stats`, `/healthz`."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from fakeprovider.ratelimit import ConfigError, RateLimit
from fakeprovider.state import STATE


def add_routes(app: web.Application) -> None:
    app.router.add_get("/_fake/calls", _list_calls)
    app.router.add_delete("/_fake/calls", _clear_calls)
    app.router.add_get("/_fake/config", _get_config)
    app.router.add_post("/_fake/config", _set_config)
    app.router.add_get("/_fake/stats", _stats)
    app.router.add_get("/healthz", _healthz)


def _json(payload: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(payload), content_type="application/json")


async def _list_calls(request: web.Request) -> web.Response:
    return _json(request.app[STATE].calls)


async def _clear_calls(request: web.Request) -> web.Response:
    request.app[STATE].clear()
    return web.Response(status=204)


def _config(request: web.Request) -> dict[str, Any]:
    limit = request.app[STATE].limiter.config
    return {"rate_limit": None if limit is None else limit.to_json()}


async def _get_config(request: web.Request) -> web.Response:
    return _json(_config(request))


async def _set_config(request: web.Request) -> web.Response:
    """Replace the run-time configuration; every bucket starts full again."""
    try:
        data = orjson.loads(await request.read())
        if not isinstance(data, dict):
            raise ConfigError("the body must be a JSON object")
        unknown = sorted(set(data) - {"rate_limit"})
        if unknown:
            raise ConfigError(f"unknown setting {unknown[0]!r}")
        limit = RateLimit.from_json(data.get("rate_limit"))
    except (orjson.JSONDecodeError, ConfigError) as exc:
        return _json({"error": str(exc)}, status=400)
    request.app[STATE].limiter.config = limit
    return _json(_config(request))


async def _stats(request: web.Request) -> web.Response:
    return _json(request.app[STATE].stats())


async def _healthz(request: web.Request) -> web.Response:
    return _json({"ok": True})
