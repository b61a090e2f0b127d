"""JSON answers in Anthropic's shapes."""

from __future__ import annotations

from collections.abc import Mapping

import orjson
from aiohttp import web

from shared.errors import FerryError
from shared.wire import ErrorEnvelope

REQUEST_ID = "request-id"
# Ferry's own id for a request; `request-id` carries the provider's when there is one.
FERRY_REQUEST_ID = "x-ferry-request-id"


def json_bytes(body: bytes | str, status: int = 200,
               headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(
        body=body.encode() if isinstance(body, str) else body,
        status=status,
        content_type="application/json",
        headers=headers,
    )


def json_response(data: object, status: int = 200,
                  headers: Mapping[str, str] | None = None) -> web.Response:
    return json_bytes(orjson.dumps(data), status, headers)


def error_response(error: FerryError, request_id: str | None) -> web.Response:
    return json_bytes(ErrorEnvelope.dump(error.error_type, error.message, request_id),
                      error.status, error.headers)


def envelope_response(status: int, error_type: str, message: str,
                      request_id: str | None) -> web.Response:
    return json_bytes(ErrorEnvelope.dump(error_type, message, request_id), status)
