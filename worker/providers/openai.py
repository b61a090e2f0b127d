"""OpenAI-compatible chat completions (OpenAI, vLLM, Ollama, …) behind Ferry's `Provider`.

The Anthropic request is translated (`openai_translate`), sent to `{base_url}/chat/completions`,
and the answer or stream translated back (`openai_stream`). `timeout_s` bounds a whole
non-streaming call; for a stream it bounds connecting and each silence between reads, so a long
answer that keeps arriving is never cut.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from typing import Any

import aiohttp
import orjson
from pydantic import ValidationError

from shared.wire import MessagesRequest, describe_validation_error
from worker.providers.base import (
    TRANSPORT_ERRORS,
    CallContext,
    Headers,
    ProviderError,
    ProviderResponse,
    SSEEvent,
    leftover,
    unreachable,
)
from worker.providers.openai_stream import OpenAIStreamTranslator, SSEDataParser
from worker.providers.openai_translate import map_openai_error, parse_completion, translate_request


def _relayed(resp: aiohttp.ClientResponse) -> Headers:
    """OpenAI's request id, retry hint and rate-limit state, under the names Anthropic clients
    (and Ferry's pacing) read."""
    out = []
    if request_id := resp.headers.get("x-request-id"):
        out.append(("request-id", request_id[:200]))
    if retry_after := resp.headers.get("retry-after"):
        out.append(("retry-after", retry_after[:50]))
    for kind in ("requests", "tokens"):  # the rate-limit state, as Anthropic names it
        for part in ("limit", "remaining"):
            value = resp.headers.get(f"x-ratelimit-{part}-{kind}", "")
            if value.isdigit() and len(value) <= 20:
                out.append((f"anthropic-ratelimit-{kind}-{part}", value))
    return tuple(out)


# The status an error that ends a stream before its first event is reported with.
_ERROR_STATUSES = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "timeout_error": 504,
    "overloaded_error": 529,
}


def _error_from_event(event: SSEEvent) -> ProviderError:
    error = orjson.loads(event.data)["error"]
    return ProviderError(_ERROR_STATUSES.get(error["type"], 502), error["type"], error["message"])


class OpenAIProvider:
    def __init__(self, session: aiohttp.ClientSession, name: str, base_url: str,
                 api_key: str | None, timeout_s: float, *,
                 stream_idle_s: float | None = None) -> None:
        self.name = name
        self._session = session
        self._url = base_url.rstrip("/") + "/chat/completions"
        self._api_key = api_key
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._stream_timeout = aiohttp.ClientTimeout(
            total=None, connect=timeout_s, sock_read=stream_idle_s or timeout_s
        )

    def _headers(self, ctx: CallContext) -> dict[str, str]:
        # The anthropic-* headers of CallContext mean nothing to this API.
        headers = {"content-type": "application/json"}
        api_key = ctx.api_key or self._api_key  # the key pool's pick wins
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        return headers

    def _prepare(self, body: bytes, stream: bool) -> tuple[MessagesRequest, bytes]:
        try:
            orjson.loads(body)
        except orjson.JSONDecodeError:
            # A number beyond a 64-bit float (valid JSON, which the front door forwards): the
            # translation could only change its value, so it is refused instead.
            raise ProviderError(400, "invalid_request_error",
                                f"request body: holds a number provider `{self.name}` cannot "
                                "take (beyond a 64-bit float)") from None
        try:
            request = MessagesRequest.model_validate_json(body)
        except ValidationError as exc:
            message = describe_validation_error(exc, body)
            raise ProviderError(400, "invalid_request_error", message) from exc
        payload = translate_request(request, request.model, stream=stream)
        try:
            return request, orjson.dumps(payload)
        except orjson.JSONEncodeError as exc:  # e.g. an integer beyond 64 bits in a schema
            raise ProviderError(400, "invalid_request_error", f"request body: {exc}") from exc

    async def create_message(self, body: bytes, ctx: CallContext) -> ProviderResponse:
        request, payload = self._prepare(body, stream=False)
        try:
            async with self._session.post(self._url, data=payload, headers=self._headers(ctx),
                                          timeout=self._timeout) as resp:
                raw = await resp.read()
                headers = _relayed(resp)
                if resp.status >= 400:
                    raise map_openai_error(resp.status, raw, resp.headers.get("retry-after"),
                                           headers=headers)
        except TRANSPORT_ERRORS as exc:
            raise unreachable(self.name, exc) from exc
        response = parse_completion(raw, request.model, request.stop_sequences or ())
        return ProviderResponse(response.body, response.stop_reason, response.usage, headers)

    async def count_tokens(self, body: bytes, ctx: CallContext) -> ProviderResponse:
        # OpenAI-compatible servers have no token-counting endpoint, and no estimate made here
        # would be honest for an arbitrary model's tokenizer.
        raise ProviderError(400, "invalid_request_error",
                            f"count_tokens is not available for OpenAI-compatible provider "
                            f"`{self.name}`")

    async def list_models(self, ctx: CallContext) -> list[dict[str, Any]]:
        return []  # the configured `models` list names them

    async def stream_message(self, body: bytes, ctx: CallContext
                             ) -> AsyncGenerator[SSEEvent, None]:
        request, payload = self._prepare(body, stream=True)
        try:
            resp = await self._session.post(self._url, data=payload, headers=self._headers(ctx),
                                            timeout=self._stream_timeout)
        except TRANSPORT_ERRORS as exc:
            raise unreachable(self.name, exc) from exc
        async with resp:
            headers = _relayed(resp)
            if resp.status >= 400:
                try:
                    raw = await resp.read()
                except TRANSPORT_ERRORS as exc:
                    raise unreachable(self.name, exc) from exc
                raise map_openai_error(resp.status, raw, resp.headers.get("retry-after"),
                                       headers=headers)
            translator = OpenAIStreamTranslator(request.model, request.stop_sequences or ())
            sent = False
            async with contextlib.aclosing(self._batches(resp, translator)) as batches:
                async for batch in batches:
                    if not sent and batch and batch[0].event == "error":
                        # Nothing went to the client yet: fail the call, so it can be retried.
                        raise _error_from_event(batch[0])
                    for event in batch:
                        if not sent:
                            event = SSEEvent(event.event, event.data, headers)
                        sent = True
                        yield event

    async def _batches(self, resp: aiohttp.ClientResponse,
                       translator: OpenAIStreamTranslator) -> AsyncGenerator[list[SSEEvent], None]:
        """The events of each read from the body, as soon as it arrives."""
        parser = SSEDataParser()
        try:
            async for data in resp.content.iter_any():
                yield self._translate(parser.feed(data), translator)
                if translator.done:
                    return
            yield self._translate(parser.close(), translator)
        except TimeoutError:
            yield translator.fail("timeout_error", f"provider `{self.name}` stopped sending")
            return
        except TRANSPORT_ERRORS as exc:
            yield self._translate(parser.feed(leftover(resp.content)), translator)
            yield translator.fail("api_error", f"the connection to provider `{self.name}` "
                                               f"broke mid-stream ({type(exc).__name__})")
            return
        # The body ended without `[DONE]`: complete if OpenAI had said why it stopped.
        if translator.finish_reason:
            yield translator.finish()
        else:
            yield translator.fail("api_error", "the provider's stream ended before it finished")

    @staticmethod
    def _translate(payloads: list[bytes], translator: OpenAIStreamTranslator) -> list[SSEEvent]:
        events: list[SSEEvent] = []
        for payload in payloads:
            if translator.done:
                break
            if payload.strip() == b"[DONE]":
                events += translator.finish()
                continue
            try:
                chunk = orjson.loads(payload)
            except orjson.JSONDecodeError:
                chunk = None
            if not isinstance(chunk, dict):
                events += translator.fail("api_error", "the provider sent invalid stream data")
            else:
                events += translator.feed(chunk)
        return events
