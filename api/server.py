"""The HTTP server under the app: errors aiohttp answers itself, before any handler runs
(malformed requests, oversized headers, bad chunking...), also get Anthropic's envelope and a
request id, and never echo the request's bytes back. No `Server` version banner either."""

from __future__ import annotations

import secrets
from typing import Any

from aiohttp import http_exceptions, web
from aiohttp.web_protocol import RequestHandler, _ErrInfo
from aiohttp.web_request import BaseRequest

from api.responses import FERRY_REQUEST_ID, REQUEST_ID
from shared.errors import InvalidRequest
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


def envelope(status: int, message: str) -> web.Response:
    request_id = new_request_id()
    body = ErrorEnvelope.of(error_type_for_status(status), message, request_id).to_json()
    return web.Response(status=status, body=body, content_type="application/json",
                        headers={REQUEST_ID: request_id, FERRY_REQUEST_ID: request_id,
                                 "Server": SERVER_NAME})


async def expect_handler(request: web.Request) -> web.StreamResponse | None:
    """`Expect: 100-continue` as aiohttp answers it; any other expectation is a 417 in the
    envelope (aiohttp's own answer is plain text echoing the header)."""
    if request.version < (1, 1):
        return None
    if request.headers.get("Expect", "").lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the response proper has not begun
        return None
    response = envelope(417, "unsupported Expect header")
    response.force_close()
    return response


class FerryRequestHandler(RequestHandler):
    def data_received(self, data: bytes) -> None:
        """aiohttp queues a framing error found mid-body (bad chunking) as a new message and
        leaves the request being read waiting for the rest of its body until a timeout. Fail
        that body at once instead (a 400), and close the connection after its answer."""
        queued = len(self._messages)
        super().data_received(data)
        request = self._current_request
        if request is None or len(self._messages) <= queued:
            return
        message, _ = self._messages[-1]
        if isinstance(message, _ErrInfo) and not request.content.is_eof():
            self._messages.pop()
            self.keep_alive(False)
            request.content.set_exception(InvalidRequest(
                "malformed request body framing (chunked encoding)"))

    def handle_error(self, request: BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status >= 500:
            log.error("HTTP-level error", status=status,
                      error=type(exc).__name__ if exc else None)
        else:
            log.info("malformed HTTP request refused", status=status,
                     error=type(exc).__name__ if exc else None)
        if request.writer.output_size > 0:
            raise ConnectionError("a response was already started; cannot send the error")
        response = envelope(status, _describe(status, exc))
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
