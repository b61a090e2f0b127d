"""Anthropic's native Messages API: the request is forwarded as the client sent it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import orjson

from shared.wire import ErrorEnvelope
from worker.providers.base import (
    CallContext,
    ProviderError,
    ProviderResponse,
    SSEEvent,
    parse_retry_after,
)

_CLIENT_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, OSError)


def error_from_body(status: int, raw: bytes, retry_after: str | None) -> ProviderError:
    """The provider's own error type and message when it sent an Anthropic envelope."""
    error_type, message = None, f"provider answered HTTP {status}"
    try:
        data = orjson.loads(raw)
        error = data.get("error") if isinstance(data, dict) else None
        if isinstance(error, dict):
            error_type = error.get("type") if isinstance(error.get("type"), str) else None
            if isinstance(error.get("message"), str):
                message = error["message"]
    except orjson.JSONDecodeError:
        if raw:
            message = f"{message}: {raw[:200].decode(errors='replace')}"
    return ProviderError(status, error_type, message, retry_after=parse_retry_after(retry_after))


class AnthropicProvider:
    name = "anthropic"

    def __init__(self, session: aiohttp.ClientSession, base_url: str, api_key: str | None,
                 default_version: str, timeout_s: float) -> None:
        self._session = session
        self._url = base_url.rstrip("/") + "/v1/messages"
        self._api_key = api_key
        self._default_version = default_version
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        # A stream may run long; what matters is that bytes keep coming.
        self._stream_timeout = aiohttp.ClientTimeout(total=timeout_s, sock_read=timeout_s)

    def _headers(self, ctx: CallContext) -> dict[str, str]:
        headers = {
            "content-type": "application/json",
            "anthropic-version": ctx.anthropic_version or self._default_version,
        }
        api_key = ctx.api_key or self._api_key
        if api_key:
            headers["x-api-key"] = api_key
        if ctx.anthropic_beta:
            headers["anthropic-beta"] = ctx.anthropic_beta
        return headers

    async def create_message(self, body: bytes, ctx: CallContext) -> ProviderResponse:
        try:
            async with self._session.post(self._url, data=body, headers=self._headers(ctx),
                                          timeout=self._timeout) as resp:
                raw = await resp.read()
                if resp.status >= 400:
                    raise error_from_body(resp.status, raw, resp.headers.get("retry-after"))
        except asyncio.TimeoutError as exc:
            raise ProviderError(504, "timeout_error", "the provider did not answer in time",
                                retryable=True) from exc
        except _CLIENT_ERRORS as exc:
            raise ProviderError(502, "api_error", f"could not reach the provider: {exc}",
                                retryable=True) from exc
        return parse_message(raw)

    async def stream_message(self, body: bytes, ctx: CallContext) -> AsyncIterator[SSEEvent]:
        try:
            resp = await self._session.post(self._url, data=body, headers=self._headers(ctx),
                                            timeout=self._stream_timeout)
        except asyncio.TimeoutError as exc:
            raise ProviderError(504, "timeout_error", "the provider did not answer in time",
                                retryable=True) from exc
        except _CLIENT_ERRORS as exc:
            raise ProviderError(502, "api_error", f"could not reach the provider: {exc}",
                                retryable=True) from exc
        async with resp:
            if resp.status >= 400:
                try:
                    raw = await resp.read()
                except _CLIENT_ERRORS:
                    raw = b""
                raise error_from_body(resp.status, raw, resp.headers.get("retry-after"))
            try:
                async for event in iter_sse(resp.content):
                    yield event
            except _CLIENT_ERRORS as exc:
                yield stream_error("api_error", f"the provider stream broke: {exc}")


def stream_error(error_type: str, message: str) -> SSEEvent:
    return SSEEvent("error", ErrorEnvelope.of(error_type, message).to_json())


def parse_message(raw: bytes) -> ProviderResponse:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ProviderError(502, "api_error", "the provider answered with invalid JSON",
                            retryable=True) from exc
    if not isinstance(data, dict) or data.get("type") != "message":
        raise ProviderError(502, "api_error", "the provider's answer is not a Message",
                            retryable=False)
    usage = data.get("usage")
    if not isinstance(usage, dict):
        usage = {}
    return ProviderResponse(
        body=raw,
        stop_reason=data.get("stop_reason"),
        usage={k: v for k, v in usage.items() if isinstance(v, int)},
    )


async def iter_sse(content: aiohttp.StreamReader) -> AsyncIterator[SSEEvent]:
    """Parse Server-Sent Events as they arrive; `data` is kept byte for byte."""
    event: str | None = None
    data: list[bytes] = []
    async for raw_line in content:
        line = raw_line.rstrip(b"\r\n")
        if not line:
            if data:
                yield SSEEvent(event or "message", b"\n".join(data))
            event, data = None, []
        elif line.startswith(b"event:"):
            event = line[6:].strip().decode()
        elif line.startswith(b"data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(b" ") else value)
    if data:
        yield SSEEvent(event or "message", b"\n".join(data))
