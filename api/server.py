"""The HTTP server under the app: errors aiohttp answers itself, before any handler runs
(malformed requests, oversized headers, bad chunking...), also get Anthropic's envelope and a
request id, and never echo the request's bytes back. No `Server` version banner either."""

from __future__ import annotations

import secrets
from typing import Any

from aiohttp import http_exceptions, web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from api.responses import FERRY_REQUEST_ID, REQUEST_ID
from shared.logging import get_logger
from shared.wire import ErrorEnvelope, error_type_for_status

log = get_logger("ferry.api")

SERVER_NAME = "ferry"


def new_request_id() -> str:
    return "req_" + secrets.token_hex(12)


def _describe(status: int, exc: BaseException | None) -> str:
    if isinstance(exc, http_exceptions.LineTooLong):
        return "the request line or a header is too long"
    if isinstance(exc, http_exceptions.BadHttpMethod):
        return "malformed request method"
    if isinstance(exc, http_exceptions.InvalidHeader):
        return "malformed request header"
    if isinstance(exc, http_exceptions.PayloadEncodingError):
        return "malformed request body framing (Content-Length / Transfer-Encoding)"
    if isinstance(exc, http_exceptions.InvalidURLError):
        return "malformed request URL"
    if status == 417:
        return "unsupported Expect header"
    if status >= 500:
        return "internal error in the gateway"
    return "malformed HTTP request"


class FerryRequestHandler(RequestHandler):
    def handle_error(self, request: BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        request_id = new_request_id()
        if status >= 500:
            log.error("HTTP-level error", status=status, request_id=request_id,
                      error=type(exc).__name__ if exc else None)
        else:
            log.info("malformed HTTP request refused", status=status, request_id=request_id,
                     error=type(exc).__name__ if exc else None)
        if request.writer.output_size > 0:
            raise ConnectionError("a response was already started; cannot send the error")
        body = ErrorEnvelope.of(error_type_for_status(status), _describe(status, exc),
                                request_id).to_json()
        response = web.Response(status=status, body=body, content_type="application/json",
                                headers={REQUEST_ID: request_id, FERRY_REQUEST_ID: request_id,
                                         "Server": SERVER_NAME})
        response.force_close()
        return response


class FerryServer(web.Server):
    def __call__(self) -> RequestHandler:
        return FerryRequestHandler(self, loop=self._loop, **self._kwargs)


class FerryRunner(web.AppRunner):
    """An AppRunner whose connections are served by FerryRequestHandler."""

    async def _make_server(self) -> web.Server:
        # The app's own Server (startup signals and all), re-made with our handler class.
        server = await super()._make_server()
        kwargs: dict[str, Any] = dict(server._kwargs)
        return FerryServer(server.request_handler, request_factory=server.request_factory,
                           handler_cancellation=server.handler_cancellation,
                           loop=server._loop, **kwargs)


async def no_banner(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: replace aiohttp's `Server: Python/x aiohttp/y` header."""
    response.headers["Server"] = SERVER_NAME
