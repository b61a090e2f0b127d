"""Request ids, the access log, and the one place where errors become Anthropic's error
envelope."""

from __future__ import annotations

import asyncio
import time

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from api.responses import FERRY_REQUEST_ID, REQUEST_ID, envelope_response, error_response
from api.server import new_request_id
from api.state import METRICS, MODE, MODEL, PROVIDER_SECONDS, REQUEST_ID_KEY
from shared.errors import FerryError
from shared.logging import get_logger
from shared.wire import error_type_for_status

log = get_logger("ferry.api")
access = get_logger("ferry.access")


def _http_error_message(request: web.Request, exc: web.HTTPException) -> str:
    if exc.status == 404:
        return f"no such endpoint: {request.method} {request.path[:200]}"
    if exc.status == 405:
        allowed = ", ".join(sorted(getattr(exc, "allowed_methods", ()) or ()))
        return f"method {request.method} is not allowed on {request.path[:200]}; use {allowed}"
    if exc.status == 413:
        return f"request body is larger than the limit of {request.client_max_size} bytes"
    return exc.reason


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    request_id = new_request_id()
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request_id)
    request[REQUEST_ID_KEY] = request_id
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
        response.headers.setdefault(REQUEST_ID, request_id)  # the provider's, when relayed
        response.headers[FERRY_REQUEST_ID] = request_id
    # aiohttp writes the response once this returns, in the same turn of the event loop: the
    # access log and metrics wait their turn behind it (in this request's context).
    asyncio.get_running_loop().call_soon(_record, request, response.status, started)
    return response


def _record(request: web.Request, status: int, started: float) -> None:
    mode = request.get(MODE)
    elapsed = time.perf_counter() - started
    if mode is None:
        return  # not an API request: health checks and scrapes are not traffic
    model = request.get(MODEL)
    access.info("request", method=request.method, path=request.path[:200], mode=mode,
                model=model[:200] if model else None, status=status,
                duration_ms=round(elapsed * 1000, 2))
    provider_s = request.get(PROVIDER_SECONDS)
    overhead_s = elapsed if mode == "submit" or mode == "poll" else (
        None if provider_s is None else max(elapsed - provider_s, 0.0))
    request.app[METRICS].answered(mode, model, status, elapsed, overhead_s)
