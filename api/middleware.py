"""Request ids and the one place where errors become Anthropic's error envelope."""

from __future__ import annotations

import secrets

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from api.responses import REQUEST_ID, envelope_response, error_response
from shared.errors import FerryError
from shared.logging import get_logger
from shared.wire import error_type_for_status

log = get_logger("ferry.api")


def _http_error_message(request: web.Request, exc: web.HTTPException) -> str:
    if exc.status == 404:
        return f"no such endpoint: {request.method} {request.path}"
    if exc.status == 405:
        allowed = ", ".join(sorted(getattr(exc, "allowed_methods", ()) or ()))
        return f"method {request.method} is not allowed on {request.path}; use {allowed}"
    if exc.status == 413:
        return f"request body is larger than the limit of {request.client_max_size} bytes"
    return exc.text or exc.reason


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    request_id = "req_" + secrets.token_hex(12)
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request_id)
    request["request_id"] = request_id
    try:
        response = await handler(request)
    except FerryError as exc:
        response = error_response(exc, request_id)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = envelope_response(
            exc.status, error_type_for_status(exc.status),
            _http_error_message(request, exc), request_id,
        )
        if exc.status == 405:
            response.headers["Allow"] = exc.headers.get("Allow", "")
    except Exception:
        log.exception("unhandled error")
        response = envelope_response(500, "api_error", "internal error in the gateway",
                                     request_id)
    if not response.prepared:
        response.headers[REQUEST_ID] = request_id
    return response
