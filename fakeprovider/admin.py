"""The test-facing endpoints: `/_fake/calls` and `/healthz`."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from fakeprovider.state import STATE


def add_routes(app: web.Application) -> None:
    app.router.add_get("/_fake/calls", _list_calls)
    app.router.add_delete("/_fake/calls", _clear_calls)
    app.router.add_get("/healthz", _healthz)


def _json(payload: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(payload), content_type="application/json")


async def _list_calls(request: web.Request) -> web.Response:
    return _json(request.app[STATE].calls)


async def _clear_calls(request: web.Request) -> web.Response:
    request.app[STATE].clear()
    return web.Response(status=204)


async def _healthz(request: web.Request) -> web.Response:
    return _json({"ok": True})
