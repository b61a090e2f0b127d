"""What the front door checks in a request body: only what Ferry needs to route and queue it.

The body itself is forwarded as the client sent it. Anthropic adds fields, roles and block
types every few months; a gateway that validated the whole schema would refuse them the day
they appear. So this reads the request's outline (model, max_tokens, the messages' roles and
block types, stream) and leaves every other field, at any depth, to the provider, whose 400
reaches the client as it was sent.

Large bodies are checked in a helper process (see `BodyChecker`), so parsing a 30 MB request
never stalls the event loop that serves everyone else.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
from collections.abc import AsyncIterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import orjson

from shared.errors import InvalidRequest
from shared.logging import get_logger

log = get_logger("ferry.api")

# The model name travels in job rows and indexes: bound it far above any real model id.
MAX_MODEL_BYTES = 512

# How long the helper process may take to start (it imports this module) before the api
# gives up on it and checks large bodies itself.
WARM_UP_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """The few facts of a request Ferry acts on."""

    model: str
    stream: bool


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def load_json(body: bytes) -> Any:
    """Parse JSON as any standard parser would. orjson is fast but refuses numbers beyond a
    64-bit float (`1e400`) that are valid JSON; those bodies get the standard parser."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as fast_error:
        try:
            return json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
        except UnicodeDecodeError:
            raise InvalidRequest("request body is not valid UTF-8") from None
        except RecursionError:
            raise InvalidRequest("request body is nested too deeply") from None
        except ValueError:
            raise InvalidRequest(f"request body is not valid JSON: {_short(fast_error)}") from None


def _short(exc: Exception) -> str:
    text = str(exc)
    return text if len(text) <= 200 else text[:200] + "…"


def _describe_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def check_model(value: Any, field: str = "model") -> str:
    if value is None:
        raise InvalidRequest(f"{field}: Field required")
    if not isinstance(value, str):
        raise InvalidRequest(f"{field}: must be a string, got {_describe_type(value)}")
    if not value:
        raise InvalidRequest(f"{field}: must not be empty")
    try:
        size = len(value.encode())
    except UnicodeEncodeError:
        raise InvalidRequest(f"{field}: is not valid Unicode text") from None
    if size > MAX_MODEL_BYTES:
        raise InvalidRequest(f"{field}: is {size} bytes long; at most {MAX_MODEL_BYTES}")
    if "\x00" in value:
        raise InvalidRequest(f"{field}: must not contain a NUL character")
    return value


def check_request(data: Any, *, count_tokens: bool = False) -> RequestFacts:
    """The outline checks; raises InvalidRequest naming the first bad field."""
    if not isinstance(data, dict):
        raise InvalidRequest("request body must be a JSON object (a Messages request)")
    model = check_model(data.get("model"))
    if not count_tokens:
        if "max_tokens" not in data:
            raise InvalidRequest("max_tokens: Field required")
        max_tokens = data["max_tokens"]
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
            raise InvalidRequest(
                f"max_tokens: must be an integer, got {_describe_type(max_tokens)}")
        if max_tokens < 0:
            raise InvalidRequest("max_tokens: must be greater than or equal to 0")
    if "messages" not in data:
        raise InvalidRequest("messages: Field required")
    messages = data["messages"]
    if not isinstance(messages, list):
        raise InvalidRequest(f"messages: must be an array, got {_describe_type(messages)}")
    if not messages:
        raise InvalidRequest("messages: must contain at least one message")
    for i, message in enumerate(messages):
        _check_message(i, message)
    stream = data.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest(f"stream: must be a boolean, got {_describe_type(stream)}")
    return RequestFacts(model=model, stream=bool(stream) and not count_tokens)


def _check_message(i: int, message: Any) -> None:
    where = f"messages.{i}"
    if not isinstance(message, dict):
        raise InvalidRequest(f"{where}: must be an object, got {_describe_type(message)}")
    role = message.get("role")
    if role is None:
        raise InvalidRequest(f"{where}.role: Field required")
    if not isinstance(role, str):
        raise InvalidRequest(f"{where}.role: must be a string, got {_describe_type(role)}")
    if "content" not in message:
        raise InvalidRequest(f"{where}.content: Field required")
    content = message["content"]
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise InvalidRequest(
            f"{where}.content: must be a string or an array of blocks, "
            f"got {_describe_type(content)}")
    for j, block in enumerate(content):
        if not isinstance(block, dict):
            raise InvalidRequest(
                f"{where}.content.{j}: must be an object, got {_describe_type(block)}")
        kind = block.get("type")
        if kind is None:
            raise InvalidRequest(f"{where}.content.{j}.type: Field required")
        if not isinstance(kind, str):
            raise InvalidRequest(
                f"{where}.content.{j}.type: must be a string, got {_describe_type(kind)}")


def inspect_body(body: bytes, count_tokens: bool = False) -> RequestFacts | str:
    """Parse and check; the error message instead of raising, so that the result crosses a
    process boundary as plain data."""
    try:
        return check_request(load_json(body), count_tokens=count_tokens)
    except InvalidRequest as exc:
        return exc.message


def _stop(pool: ProcessPoolExecutor) -> None:
    pool.shutdown(wait=False, cancel_futures=True)


def _warm_up() -> None:
    """Run in the helper process once, so the first large request does not pay its start."""


class BodyChecker:
    """Checks bodies on the event loop when small, in a helper process when large."""

    def __init__(self, offload_bytes: int, processes: int = 1) -> None:
        self._offload_bytes = offload_bytes
        self._processes = processes
        self._pool: ProcessPoolExecutor | None = None

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[BodyChecker]:
        # forkserver: the helpers start from a clean interpreter, not a fork of a process
        # with an event loop and open sockets.
        pool = ProcessPoolExecutor(self._processes,
                                   mp_context=multiprocessing.get_context("forkserver"))
        try:
            # Bounded: a helper that cannot start (a wedged forkserver, an exhausted process
            # table) must not keep the api from serving; large bodies are then parsed here.
            await asyncio.wait_for(
                asyncio.get_running_loop().run_in_executor(pool, _warm_up), WARM_UP_TIMEOUT_S)
            self._pool = pool
        except (asyncio.TimeoutError, OSError, BrokenProcessPool) as exc:
            log.warning("body-check helper process did not start; checking in the api process",
                        error=type(exc).__name__)
            _stop(pool)
        try:
            yield self
        finally:
            if self._pool is not None:
                _stop(self._pool)
                self._pool = None

    async def check(self, body: bytes, *, count_tokens: bool = False) -> RequestFacts:
        if self._pool is None or len(body) <= self._offload_bytes:
            result = inspect_body(body, count_tokens)
        else:
            try:
                result = await asyncio.get_running_loop().run_in_executor(
                    self._pool, inspect_body, body, count_tokens)
            except BrokenProcessPool:  # the helper died (killed, out of memory): check here
                broken, self._pool = self._pool, None
                if broken is not None:
                    log.warning("body-check helper process died; checking in the api process")
                    _stop(broken)
                result = inspect_body(body, count_tokens)
        if isinstance(result, str):
            raise InvalidRequest(result)
        return result
