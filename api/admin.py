"""The admin API for automation: /admin/v1/keys (list, create, update, revoke). It exists only
when FERRY_ADMIN_KEY is set, and answers only to that key (x-api-key or Bearer)."""

from __future__ import annotations

import hmac

import orjson
from aiohttp import web
from pydantic import ValidationError

from api.auth import presented_secret
from api.responses import json_response
from api.state import KEYSTORE, MODE, SETTINGS
from shared.errors import AuthenticationFailed, Conflict, InvalidRequest, NotFound
from shared.keyadmin import KeyChanges, NewKey, create_key, update_key, view
from shared.keystore import KeyExists, NoSuchKey


def _guard(request: web.Request) -> None:
    request[MODE] = "admin"
    admin = request.app[SETTINGS].admin_key
    assert admin is not None  # the routes exist only with it
    presented = presented_secret(request.headers).encode("utf-8", "surrogateescape")
    if not hmac.compare_digest(presented, admin.get_secret_value().encode()):
        raise AuthenticationFailed("the admin API needs FERRY_ADMIN_KEY as x-api-key or "
                                   "Authorization: Bearer")


async def _body(request: web.Request) -> dict[str, object]:
    try:
        data = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise InvalidRequest("request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise InvalidRequest("request body must be a JSON object")
    return data


def _invalid(exc: ValidationError) -> InvalidRequest:
    error = exc.errors(include_url=False)[0]
    where = ".".join(str(p) for p in error["loc"])
    return InvalidRequest(f"{where}: {error['msg']}" if where else error["msg"])


async def list_keys(request: web.Request) -> web.Response:
    _guard(request)
    return json_response({"data": [view(k) for k in await request.app[KEYSTORE].all()]})


async def create(request: web.Request) -> web.Response:
    _guard(request)
    try:
        spec = NewKey.model_validate(await _body(request))
        record, secret = await create_key(request.app[KEYSTORE], spec)
    except ValidationError as exc:
        raise _invalid(exc) from None
    except KeyExists as exc:
        raise Conflict(str(exc)) from None
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    return json_response({**view(record), "secret": secret}, status=201)


async def update(request: web.Request) -> web.Response:
    _guard(request)
    data = await _body(request)
    try:
        changes = KeyChanges.model_validate(data)
        record = await update_key(request.app[KEYSTORE], request.match_info["name"], changes,
                                  set(data))
    except ValidationError as exc:
        raise _invalid(exc) from None
    except NoSuchKey as exc:
        raise NotFound(str(exc)) from None
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    return json_response(view(record))


async def revoke(request: web.Request) -> web.Response:
    _guard(request)
    try:
        record = await request.app[KEYSTORE].revoke(request.match_info["name"])
    except NoSuchKey as exc:
        raise NotFound(str(exc)) from None
    return json_response(view(record))


def add_routes(app: web.Application) -> None:
    app.router.add_get("/admin/v1/keys", list_keys)
    app.router.add_post("/admin/v1/keys", create)
    app.router.add_patch("/admin/v1/keys/{name}", update)
    app.router.add_post("/admin/v1/keys/{name}/revoke", revoke)
    app.router.add_delete("/admin/v1/keys/{name}", revoke)
