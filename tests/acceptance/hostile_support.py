"""Helpers for the hostile-input tests: raw HTTP over asyncio streams (for requests no HTTP
client library will send: non-ASCII header bytes, broken framing, a body that stalls), and
the checks every error answer must pass (Anthropic's envelope, a request id, no banner, no
echo of what the client sent)."""

from __future__ import annotations

import asyncio
import re
import struct
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import brotli
import orjson

from tests.acceptance.interactive_support import (
    FERRY_HEADERS,
    echo,
    gather_bounded,
    parse_sse,
)
from tests.acceptance.stack import Stack
from tests.support import MODEL, eventually, request_body

# Each raw exchange is bounded: a gateway that never answers fails the test instead of
# hanging it. Generous on purpose (a busy 2-core machine); never a speed assertion.
HANG_GUARD_S = 60.0

_REQUEST_ID = re.compile(r"^req_[0-9a-f]{24}$")

Header = tuple[bytes | str, bytes | str]


def _bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def http_request(method: bytes | str, target: bytes | str, headers: Iterable[Header] = (),
                 body: bytes = b"", *, content_length: bool = True,
                 version: bytes = b"HTTP/1.1") -> bytes:
    """A request's bytes exactly as given: nothing is validated or escaped. `Host` and
    `Connection: close` are added; `Content-Length` too unless `content_length` is False."""
    lines = [_bytes(method) + b" " + _bytes(target) + b" " + version,
             b"Host: 127.0.0.1", b"Connection: close"]
    lines += [_bytes(name) + b": " + _bytes(value) for name, value in headers]
    if content_length and body:
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((v for n, v in self.headers if n.lower() == name.lower()), None)

    def header_all(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name.lower()]

    def json(self) -> Any:
        return orjson.loads(self.body)

    def __repr__(self) -> str:
        body = self.body if len(self.body) <= 600 else self.body[:600] + b"..."
        return f"RawResponse({self.status}, {self.headers!r}, {body!r})"


async def read_response(reader: asyncio.StreamReader, *, head_request: bool = False
                        ) -> RawResponse:
    """One response; interim `100 Continue` answers are skipped."""
    head = await reader.readuntil(b"\r\n\r\n")
    while head.startswith(b"HTTP/1.1 100 "):
        head = await reader.readuntil(b"\r\n\r\n")
    lines = head[:-4].split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.append((name.decode("latin-1").strip(), value.decode("latin-1").strip()))
    response = RawResponse(status, headers, b"")
    length = response.header("content-length")
    if head_request:
        return response
    if length is not None:
        response.body = await reader.readexactly(int(length))
    elif (response.header("transfer-encoding") or "").lower() == "chunked":
        response.body = await _read_chunked(reader)
    else:
        response.body = await reader.read()
    return response


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    out = bytearray()
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return bytes(out)
        out += await reader.readexactly(size)
        await reader.readexactly(2)


async def exchange(port: int, data: bytes, *,
                   timeout: float = HANG_GUARD_S) -> RawResponse:  # noqa: ASYNC109
    """Send `data` and read the answer. The connection stays open after the last byte sent:
    a request that promised more body than it sent is left stalled, as a slow or malicious
    client would leave it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        async with asyncio.timeout(timeout):
            writer.write(data)
            await writer.drain()
            return await read_response(reader, head_request=data.startswith(b"HEAD "))
    finally:
        writer.close()


async def send_raw(port: int, method: bytes | str, target: bytes | str,
                   headers: Iterable[Header] = (), body: bytes = b"",
                   **options: Any) -> RawResponse:
    return await exchange(port, http_request(method, target, headers, body, **options))


def assert_error_envelope(response: RawResponse, *, status: int | None = None,
                          marker: bytes | None = None) -> dict[str, Any]:
    """A 4xx in Anthropic's error envelope with Ferry's request id in the body and both id
    headers, `Server: ferry`, and (when a `marker` was put in the request) not a byte of it
    echoed back. Returns the envelope's `error` object."""
    assert 400 <= response.status < 500, response
    if status is not None:
        assert response.status == status, response
    assert (response.header("content-type") or "").startswith("application/json"), response
    data = response.json()
    assert data["type"] == "error", data
    assert set(data) == {"type", "error", "request_id"}, data
    error = data["error"]
    assert isinstance(error["type"], str) and error["type"], data
    assert isinstance(error["message"], str) and error["message"], data
    assert _REQUEST_ID.match(data["request_id"]), data
    assert response.header("x-ferry-request-id") == data["request_id"], response
    assert response.header("request-id") == data["request_id"], response
    assert_no_banner(response)
    if marker is not None:
        assert marker not in response.body, response
        assert not any(marker.decode("latin-1") in v for _, v in response.headers), response
    return error


def assert_no_banner(response: RawResponse) -> None:
    servers = response.header_all("server")
    assert servers == ["ferry"], response


# --- compression bombs ----------------------------------------------------------------------

_SEGMENT = 16 << 20


def deflate_bomb(inflated: int, container: str) -> bytes:
    """`inflated` zero bytes (a multiple of 16 MiB) as a complete, valid `gzip` or zlib
    (`deflate`) stream of about 1/1000 the size. Built from one compressed segment repeated
    (each ends in a full flush, so the copies are identical), which takes a second where
    compressing 1 GiB would take many."""
    assert inflated % _SEGMENT == 0
    count = inflated // _SEGMENT
    zero = bytes(_SEGMENT)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    segment = compressor.compress(zero) + compressor.flush(zlib.Z_FULL_FLUSH)
    raw = segment * count + compressor.flush(zlib.Z_FINISH)
    if container == "gzip":
        crc = 0
        for _ in range(count):
            crc = zlib.crc32(zero, crc)
        return (b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff" + raw
                + struct.pack("<II", crc, inflated & 0xFFFFFFFF))
    assert container == "deflate", container
    adler = 1
    for _ in range(count):
        adler = zlib.adler32(zero, adler)
    return b"\x78\xda" + raw + struct.pack(">I", adler)


def brotli_bomb(inflated: int) -> bytes:
    assert inflated % _SEGMENT == 0
    zero = bytes(_SEGMENT)
    compressor = brotli.Compressor(quality=5)
    parts = [compressor.process(zero) for _ in range(inflated // _SEGMENT)]
    return b"".join(parts) + compressor.finish()


# --- answers through aiohttp, checked the same way ------------------------------------------


async def post(http: aiohttp.ClientSession, url: str, body: bytes,
               headers: Mapping[str, str], *,
               timeout: float = HANG_GUARD_S) -> RawResponse:  # noqa: ASYNC109
    """POST and read the whole answer (a stream too), bounded by a hang guard."""
    async with asyncio.timeout(timeout), http.post(url, data=body, headers=headers) as resp:
        return RawResponse(resp.status, list(resp.headers.items()), await resp.read())


def assert_clean_error(response: RawResponse, *, low: int = 400, high: int = 499
                       ) -> dict[str, Any]:
    """An error answer a client can act on, whoever wrote it (Ferry, or a provider whose
    answer Ferry relays): an error envelope with a type and a message, Ferry's request id in
    `x-ferry-request-id`, a `request-id`, no banner, and no internal address."""
    assert low <= response.status <= high, response
    data = response.json()
    assert data["type"] == "error", data
    assert isinstance(data["error"]["type"], str) and data["error"]["type"], data
    assert isinstance(data["error"]["message"], str) and data["error"]["message"], data
    assert _REQUEST_ID.match(response.header("x-ferry-request-id") or ""), response
    assert (response.header("request-id") or "").startswith("req_"), response
    if "request_id" in data:
        assert isinstance(data["request_id"], str), data
    assert_no_banner(response)
    for leak in (b"127.0.0.1", b"localhost", b"Traceback"):
        assert leak not in response.body, response
    return dict(data["error"])


def assert_alive(stack: Stack) -> None:
    """Every long-running process of the stack is still up (`migrate` exits by design)."""
    dead = {name: proc.returncode for name, proc in stack.processes.items()
            if name != "migrate" and proc.poll() is not None}
    assert not dead, f"processes exited: {dead}"


# --- well-formed requests, and what they must get ----------------------------------------------

MESSAGES = "/anthropic/v1/messages"
COUNT_TOKENS = "/anthropic/v1/messages/count_tokens"
ASYNC = {**FERRY_HEADERS, "x-bf-async": "true"}


def streamed_text(answer: RawResponse) -> str:
    """The text of a complete SSE answer (asserted to end with message_stop)."""
    events = parse_sse(answer.body)
    assert events[-1][0] == "message_stop", events[-3:]
    return "".join(data["delta"]["text"] for name, data in events
                   if name == "content_block_delta" and data["delta"]["type"] == "text_delta")


async def good_call(http: aiohttp.ClientSession, stack: Stack, text: str, *,
                    model: str = MODEL, stream: bool = False) -> None:
    """A well-formed sync or stream request; asserts it got the fake's answer in full."""
    answer = await post(http, stack.url + MESSAGES,
                        request_body(text, model=model, **({"stream": True} if stream else {})),
                        FERRY_HEADERS)
    assert answer.status == 200, answer
    if stream:
        assert streamed_text(answer) == echo(text), answer
    else:
        message = answer.json()
        assert message["type"] == "message", message
        assert message["content"][0]["text"] == echo(text), message


async def good_submit(http: aiohttp.ClientSession, stack: Stack, text: str, *,
                      model: str = MODEL) -> str:
    """A well-formed async submit; asserts it was accepted and returns the job id."""
    answer = await post(http, stack.url + MESSAGES, request_body(text, model=model), ASYNC)
    assert answer.status == 200, answer
    assert answer.header("x-bf-async-status") == "pending", answer
    job_id: str = answer.json()["id"]
    assert job_id.startswith("job_"), answer
    return job_id


async def poll(http: aiohttp.ClientSession, stack: Stack, job_id: str,
               headers: dict[str, str] | None = None) -> RawResponse:
    return await post(http, stack.url + MESSAGES, request_body("poll"),
                      {**(headers or FERRY_HEADERS), "x-bf-async-id": job_id})


async def final_poll(http: aiohttp.ClientSession, stack: Stack, job_id: str,
                     headers: dict[str, str] | None = None) -> RawResponse:
    """Poll until the job is completed or failed (hang-guarded)."""
    async def done() -> RawResponse | None:
        answer = await poll(http, stack, job_id, headers)
        if answer.header("x-bf-async-status") in ("pending", "processing"):
            return None
        return answer
    return await eventually(done, timeout=HANG_GUARD_S, interval=0.1,
                            what=f"job {job_id} to finish")


async def expect_job_answers(http: aiohttp.ClientSession, stack: Stack,
                             jobs: dict[str, str]) -> None:
    """Each job (id -> prompt text) polls as completed with the fake's answer."""
    async def check(job_id: str, text: str) -> None:
        answer = await final_poll(http, stack, job_id)
        assert answer.status == 200 and answer.header("x-bf-async-status") == "completed", \
            answer
        assert answer.json()["content"][0]["text"] == echo(text), answer
    await gather_bounded(20, *(check(j, t) for j, t in jobs.items()))


def assert_answer_or_refusal(answer: RawResponse, text: str, stream: bool) -> None:
    """A request that may be refused: the fake's answer in full, or a clean 4xx."""
    if answer.status != 200:
        assert_clean_error(answer)
        return
    if stream:
        assert streamed_text(answer) == echo(text), answer
    else:
        assert answer.json()["content"][0]["text"] == echo(text), answer
