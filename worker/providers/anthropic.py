"""Anthropic's native Messages API: the request is forwarded as the client sent it, and the
provider's answers (errors included) come back as it sent them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import aiohttp
import orjson

from shared.wire import ErrorEnvelope
from worker.providers.base import (
    TRANSPORT_ERRORS,
    CallContext,
    Headers,
    ProviderError,
    ProviderResponse,
    SSEEvent,
    SSEParser,
    leftover,
    parse_retry_after,
    relayed_headers,
    unreachable,
)

_MAX_MODEL_PAGES = 10


def error_from_body(status: int, raw: bytes, headers: Headers = (), *,
                    provider: str = "anthropic") -> ProviderError:
    """The provider's own error: its body is relayed verbatim when it is Anthropic's envelope;
    its type and message are read for logs, metrics and the job history."""
    error_type, message, verbatim = None, f"provider `{provider}` answered HTTP {status}", None
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        data = None
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        if isinstance(error.get("type"), str):
            error_type = error["type"]
            verbatim = raw
        if isinstance(error.get("message"), str):
            message = error["message"]
    retry_after_header = next((v for n, v in headers if n == "retry-after"), None)
    retry_after = parse_retry_after(retry_after_header)
    retryable = None
    if status == 429 and retry_after_header is None:
        # Anthropic sends retry-after with every rate limit; a 429 without one is a spend cap,
        # which no retry will lift.
        retryable = False
    return ProviderError(status, error_type, message, retry_after=retry_after,
                         retryable=retryable, body=verbatim, headers=headers)


def parse_message(raw: bytes, headers: Headers = (), *,
                  provider: str = "anthropic") -> ProviderResponse:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ProviderError(502, "api_error",
                            f"provider `{provider}` answered with invalid JSON",
                            retryable=True, headers=headers) from exc
    if not isinstance(data, dict) or data.get("type") != "message":
        raise ProviderError(502, "api_error", f"provider `{provider}`'s answer is not a Message",
                            retryable=False, headers=headers)
    usage = data.get("usage")
    if not isinstance(usage, dict):
        usage = {}
    stop_reason = data.get("stop_reason")
    return ProviderResponse(
        body=raw,
        stop_reason=stop_reason if isinstance(stop_reason, str) else None,
        usage={k: v for k, v in usage.items() if isinstance(v, int) and not isinstance(v, bool)},
        headers=headers,
    )


def stream_error(error_type: str, message: str) -> SSEEvent:
    return SSEEvent("error", ErrorEnvelope.of(error_type, message).to_json())


class AnthropicProvider:
    def __init__(self, session: aiohttp.ClientSession, base_url: str, api_key: str | None,
                 default_version: str, timeout_s: float, *, name: str = "anthropic",
                 stream_idle_s: float | None = None) -> None:
        self.name = name
        self._session = session
        self._base = base_url.rstrip("/")
        self._api_key = api_key
        self._default_version = default_version
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        # A stream may run long; what matters is that bytes keep coming.
        self._stream_timeout = aiohttp.ClientTimeout(
            total=timeout_s, sock_connect=timeout_s, sock_read=stream_idle_s or timeout_s)

    def _url(self, path: str, ctx: CallContext) -> str:
        return f"{self._base}{path}?{ctx.query}" if ctx.query else f"{self._base}{path}"

    def _headers(self, ctx: CallContext, *, json_body: bool = True) -> dict[str, str]:
        headers = dict(ctx.forward_headers)
        headers.setdefault("anthropic-version", self._default_version)
        if json_body:
            headers["content-type"] = "application/json"
        api_key = ctx.api_key or self._api_key
        if api_key:
            headers["x-api-key"] = api_key
        return headers

    async def _post(self, path: str, body: bytes, ctx: CallContext) -> tuple[bytes, Headers]:
        try:
            async with self._session.post(self._url(path, ctx), data=body,
                                          headers=self._headers(ctx),
                                          timeout=self._timeout) as resp:
                raw = await resp.read()
                headers = relayed_headers(resp.headers.items())
                if resp.status >= 400:
                    raise error_from_body(resp.status, raw, headers, provider=self.name)
                return raw, headers
        except TRANSPORT_ERRORS as exc:
            raise unreachable(self.name, exc) from exc

    async def create_message(self, body: bytes, ctx: CallContext) -> ProviderResponse:
        raw, headers = await self._post("/v1/messages", body, ctx)
        return parse_message(raw, headers, provider=self.name)

    async def count_tokens(self, body: bytes, ctx: CallContext) -> ProviderResponse:
        raw, headers = await self._post("/v1/messages/count_tokens", body, ctx)
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            data = None
        if not isinstance(data, dict) or not isinstance(data.get("input_tokens"), int):
            raise ProviderError(502, "api_error",
                                f"provider `{self.name}`'s token count is not one",
                                retryable=False, headers=headers)
        return ProviderResponse(body=raw, headers=headers)

    async def list_models(self, ctx: CallContext) -> list[dict[str, Any]]:
        models: list[dict[str, Any]] = []
        query = "limit=1000"
        for _ in range(_MAX_MODEL_PAGES):
            try:
                async with self._session.get(f"{self._base}/v1/models?{query}",
                                             headers=self._headers(ctx, json_body=False),
                                             timeout=self._timeout) as resp:
                    raw = await resp.read()
                    if resp.status >= 400:
                        raise error_from_body(resp.status, raw, provider=self.name)
            except TRANSPORT_ERRORS as exc:
                raise unreachable(self.name, exc) from exc
            try:
                page = orjson.loads(raw)
            except orjson.JSONDecodeError:
                page = None
            if not isinstance(page, dict) or not isinstance(page.get("data"), list):
                raise ProviderError(502, "api_error",
                                    f"provider `{self.name}`'s model list is not one")
            models.extend(m for m in page["data"]
                          if isinstance(m, dict) and isinstance(m.get("id"), str))
            last = page.get("last_id")
            if not page.get("has_more") or not isinstance(last, str):
                break
            query = f"limit=1000&after_id={last}"
        return models

    async def stream_message(self, body: bytes, ctx: CallContext
                             ) -> AsyncGenerator[SSEEvent, None]:
        try:
            resp = await self._session.post(self._url("/v1/messages", ctx), data=body,
                                            headers=self._headers(ctx),
                                            timeout=self._stream_timeout)
        except TRANSPORT_ERRORS as exc:
            raise unreachable(self.name, exc) from exc
        async with resp:
            headers = relayed_headers(resp.headers.items())
            if resp.status >= 400:
                try:
                    raw = await resp.read()
                except TRANSPORT_ERRORS:
                    raw = b""
                raise error_from_body(resp.status, raw, headers, provider=self.name)
            first = True
            async for event in self._events(resp):
                if first:
                    event = SSEEvent(event.event, event.data, headers)
                    first = False
                yield event

    async def _events(self, resp: aiohttp.ClientResponse) -> AsyncIterator[SSEEvent]:
        """The provider's events as they arrive; a broken, stalled, or oversized stream ends
        with an `error` event after the events that did arrive."""
        parser = SSEParser()
        ended = False
        try:
            async for chunk in resp.content.iter_any():
                for event in parser.feed(chunk):
                    ended = ended or event.event in ("message_stop", "error")
                    yield event
            for event in parser.close():
                ended = ended or event.event in ("message_stop", "error")
                yield event
            if not ended:
                yield stream_error("api_error",
                                   f"provider `{self.name}`'s stream ended before message_stop")
        except ValueError as exc:  # an event over the size limit
            yield stream_error("api_error", f"provider `{self.name}` sent {exc}")
        except asyncio.TimeoutError:
            yield stream_error("timeout_error", f"provider `{self.name}` stopped sending")
        except TRANSPORT_ERRORS as exc:
            try:
                for event in parser.feed(leftover(resp.content)):
                    yield event
            except ValueError:
                pass
            yield stream_error(
                "api_error",
                f"the connection to provider `{self.name}` broke mid-stream "
                f"({type(exc).__name__})")
