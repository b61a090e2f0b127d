"""OpenAI-compatible chat completions (OpenAI, vLLM, Ollama, …) behind Ferry's `Provider`.

The Anthropic request is translated (`openai_translate`), sent to `{base_url}/chat/completions`,
and the answer or stream translated back (`openai_stream`). `timeout_s` bounds a whole
non-streaming call; for a stream it bounds connecting and each silence between reads, so a long
answer that keeps arriving is never cut.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator

import aiohttp
import orjson
from pydantic import ValidationError

from shared.wire import MessagesRequest, describe_validation_error
from worker.providers.base import CallContext, ProviderError, ProviderResponse, SSEEvent
from worker.providers.openai_stream import OpenAIStreamTranslator, SSEDataParser
from worker.providers.openai_translate import map_openai_error, parse_completion, translate_request

_CLIENT_ERRORS = (aiohttp.ClientError, OSError)  # TimeoutError is handled first


def _timeout_error() -> ProviderError:
    return ProviderError(504, "timeout_error", "the provider did not answer in time",
                         retryable=True)


def _unreachable(exc: Exception) -> ProviderError:
    return ProviderError(502, "api_error", f"could not reach the provider: {exc}", retryable=True)


# The status an error that ends a stream before its first event is reported with.
_ERROR_STATUSES = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "overloaded_error": 529,
}


def _error_from_event(event: SSEEvent) -> ProviderError:
    error = orjson.loads(event.data)["error"]
    return ProviderError(_ERROR_STATUSES.get(error["type"], 502), error["type"], error["message"])


class OpenAIProvider:
    def __init__(self, session: aiohttp.ClientSession, name: str, base_url: str,
                 api_key: str | None, timeout_s: float) -> None:
        self.name = name
        self._session = session
        self._url = base_url.rstrip("/") + "/chat/completions"
        self._api_key = api_key
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._stream_timeout = aiohttp.ClientTimeout(
            total=None, connect=timeout_s, sock_read=timeout_s
        )

    def _headers(self, ctx: CallContext) -> dict[str, str]:
        # The anthropic-version / anthropic-beta of CallContext mean nothing to this API.
        headers = {"content-type": "application/json"}
        api_key = ctx.api_key or self._api_key  # the key pool's pick wins
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        return headers

    def _prepare(self, body: bytes, stream: bool) -> tuple[MessagesRequest, bytes]:
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
                if resp.status >= 400:
                    raise map_openai_error(resp.status, raw, resp.headers.get("retry-after"))
        except TimeoutError as exc:
            raise _timeout_error() from exc
        except _CLIENT_ERRORS as exc:
            raise _unreachable(exc) from exc
        return parse_completion(raw, request.model, request.stop_sequences or ())

    async def stream_message(self, body: bytes, ctx: CallContext) -> AsyncIterator[SSEEvent]:
        request, payload = self._prepare(body, stream=True)
        try:
            resp = await self._session.post(self._url, data=payload, headers=self._headers(ctx),
                                            timeout=self._stream_timeout)
        except TimeoutError as exc:
            raise _timeout_error() from exc
        except _CLIENT_ERRORS as exc:
            raise _unreachable(exc) from exc
        async with resp:
            if resp.status >= 400:
                try:
                    raw = await resp.read()
                except TimeoutError as exc:
                    raise _timeout_error() from exc
                except _CLIENT_ERRORS as exc:
                    raise _unreachable(exc) from exc
                raise map_openai_error(resp.status, raw, resp.headers.get("retry-after"))
            translator = OpenAIStreamTranslator(request.model, request.stop_sequences or ())
            sent = False
            async with contextlib.aclosing(self._batches(resp, translator)) as batches:
                async for batch in batches:
                    if not sent and batch and batch[0].event == "error":
                        # Nothing went to the client yet: fail the call, so it can be retried.
                        raise _error_from_event(batch[0])
                    for event in batch:
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
            yield translator.fail("api_error", "the provider stopped sending")
            return
        except _CLIENT_ERRORS as exc:
            yield translator.fail("api_error", f"lost the provider mid-stream: {exc}")
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
