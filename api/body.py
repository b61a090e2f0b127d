"""Reading a request body: bounded in time and size, compressed bodies included.

aiohttp's own decompression runs a whole body on the event loop with no limit on what it
inflates to (a 1 MB gzip bomb becomes 1 GB). Ferry reads the raw bytes instead and inflates
them here in slices, yielding to the loop between slices and stopping at the body limit.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncIterator, Callable, Iterator

import brotli
from aiohttp import web

from shared.errors import FerryError, InvalidRequest, RequestTimeout, RequestTooLarge

_SLICE = 256 * 1024  # inflated bytes per step on the event loop


class UnsupportedMediaType(FerryError):
    status = 415
    error_type = "invalid_request_error"


# A JSON body under a loose type (text/plain, curl -d's form type, none at all) is taken: the
# JSON parse is the real check. Types that say the body is something else are refused.
_NOT_JSON = ("multipart/", "application/xml", "text/xml", "text/html",
             "application/octet-stream")


def check_content_type(request: web.Request) -> None:
    content_type = request.headers.get("Content-Type")
    if content_type is None:
        return
    mime = content_type.split(";", 1)[0].strip().lower()
    if mime.startswith(_NOT_JSON):
        raise UnsupportedMediaType(
            f"Content-Type must be application/json, got {content_type[:100]!r}")


async def read_body(request: web.Request, max_bytes: int, timeout_s: float) -> bytes:
    """The request body, inflated if it was sent compressed. Raises 408 when it does not
    arrive in time, 413 past `max_bytes` (compressed or not), 415 for an unknown encoding."""
    codings = _codings(request, max_bytes)
    try:
        async with asyncio.timeout(timeout_s):
            raw = await request.read()  # aiohttp enforces client_max_size on the raw bytes
    except TimeoutError:
        raise RequestTimeout(f"the request body did not arrive within {timeout_s:g} s"
                             ) from None
    except web.HTTPRequestEntityTooLarge:
        raise RequestTooLarge(f"request body is larger than the limit of {max_bytes} bytes"
                              ) from None
    if not codings:
        return raw
    return await inflate(raw, codings[0], max_bytes)


def _codings(request: web.Request, max_bytes: int) -> list[str]:
    if request.content_length is not None and request.content_length > max_bytes:
        raise RequestTooLarge(f"request body is larger than the limit of {max_bytes} bytes")
    codings = [c.strip().lower() for value in request.headers.getall("Content-Encoding", [])
               for c in value.split(",") if c.strip().lower() not in ("", "identity")]
    if len(codings) > 1:
        raise UnsupportedMediaType(f"several content-codings ({', '.join(codings)[:100]}) are "
                                   "not supported: use one of gzip, deflate or br")
    return codings


async def stream_body(request: web.Request, max_bytes: int,
                      deadline: float) -> AsyncIterator[bytes]:
    """The request body in pieces as it arrives, inflated if sent compressed, for bodies too
    large to hold at once (a batch). 413 past `max_bytes` (compressed or not), 408 if it has
    not all arrived by the loop time `deadline`."""
    codings = _codings(request, max_bytes)
    decoder: zlib._Decompress | brotli.Decompressor | None = None
    if codings:
        _decoder(codings[0], b"")  # refuses an unknown coding
        decoder = (brotli.Decompressor() if codings[0] == "br"
                   else zlib.decompressobj(16 + zlib.MAX_WBITS) if "gzip" in codings[0]
                   else None)
    received = inflated = 0
    loop = asyncio.get_running_loop()
    while True:
        try:
            async with asyncio.timeout_at(deadline):
                chunk = await request.content.readany()
        except TimeoutError:
            raise RequestTimeout("the request body did not arrive in time") from None
        if not chunk:
            break
        received += len(chunk)
        if received > max_bytes:
            raise RequestTooLarge(f"request body is larger than the limit of {max_bytes} bytes")
        if codings and decoder is None:  # deflate: wrapped or raw, seen in the first bytes
            wrapped = len(chunk) >= 2 and chunk[0] & 0x0F == 8 and (
                chunk[0] << 8 | chunk[1]) % 31 == 0
            decoder = zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)
        for piece in _inflate_pieces(decoder, chunk, codings[0] if codings else ""):
            inflated += len(piece)
            if inflated > max_bytes:
                raise RequestTooLarge(
                    f"request body inflates to more than the limit of {max_bytes} bytes")
            yield piece
        if loop.time() > deadline:
            raise RequestTimeout("the request body did not arrive in time")
    if decoder is not None and not _finished(decoder):
        raise InvalidRequest(f"request body is truncated {codings[0]} data")


def _finished(decoder: zlib._Decompress | brotli.Decompressor) -> bool:
    if isinstance(decoder, brotli.Decompressor):
        return bool(decoder.is_finished())
    return decoder.eof


def _inflate_pieces(decoder: zlib._Decompress | brotli.Decompressor | None, chunk: bytes,
                    encoding: str) -> Iterator[bytes]:
    if decoder is None:
        yield chunk
        return
    try:
        if encoding == "br":
            assert isinstance(decoder, brotli.Decompressor)
            piece = decoder.process(chunk, output_buffer_limit=_SLICE)
            while piece:
                yield piece
                if decoder.is_finished() or decoder.can_accept_more_data():
                    break
                piece = decoder.process(b"", output_buffer_limit=_SLICE)
            return
        assert not isinstance(decoder, brotli.Decompressor)
        pending = chunk
        while pending:
            piece = decoder.decompress(pending, _SLICE)
            pending = decoder.unconsumed_tail
            if piece:
                yield piece
            if decoder.eof:
                if pending or decoder.unused_data:
                    raise InvalidRequest(f"request body has data after its {encoding} stream")
                return
    except (zlib.error, brotli.error):
        raise InvalidRequest(f"request body is not valid {encoding} data") from None


async def inflate(data: bytes, encoding: str, max_bytes: int) -> bytes:
    step = _decoder(encoding, data)
    out = bytearray()
    pending = data
    while True:
        piece, pending, finished = step(pending)
        out += piece
        if len(out) > max_bytes:
            raise RequestTooLarge(
                f"request body inflates to more than the limit of {max_bytes} bytes")
        if finished:
            return bytes(out)
        await asyncio.sleep(0)  # let other requests run between slices


Step = Callable[[bytes], tuple[bytes, bytes, bool]]


def _decoder(encoding: str, data: bytes) -> Step:
    if encoding in ("gzip", "x-gzip"):
        return _zlib_step(zlib.decompressobj(16 + zlib.MAX_WBITS), encoding)
    if encoding == "deflate":
        # As RFC 9110 means it (zlib-wrapped), or raw deflate as some clients send it: a
        # zlib header is two bytes whose value is a multiple of 31, with method 8.
        wrapped = len(data) >= 2 and data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0
        return _zlib_step(zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS),
                          encoding)
    if encoding == "br":
        return _brotli_step(brotli.Decompressor())
    raise UnsupportedMediaType(
        f"Content-Encoding {encoding[:50]!r} is not supported; use gzip, deflate or br")


def _zlib_step(decoder: zlib._Decompress, encoding: str) -> Step:
    def step(data: bytes) -> tuple[bytes, bytes, bool]:
        try:
            piece = decoder.decompress(data, _SLICE)
        except zlib.error:
            raise InvalidRequest(f"request body is not valid {encoding} data") from None
        rest = decoder.unconsumed_tail
        if decoder.eof:
            return piece, b"", True
        if not rest and not piece:
            raise InvalidRequest(f"request body is truncated {encoding} data")
        return piece, rest, False
    return step


def _brotli_step(decoder: brotli.Decompressor) -> Step:
    def step(data: bytes) -> tuple[bytes, bytes, bool]:
        # The whole input goes in with the first call; later calls only drain the output.
        try:
            piece = decoder.process(data, output_buffer_limit=_SLICE)
        except brotli.error:
            raise InvalidRequest("request body is not valid br data") from None
        if decoder.is_finished():
            return piece, b"", True
        if not piece and decoder.can_accept_more_data():
            raise InvalidRequest("request body is truncated br data")
        return piece, b"", False
    return step
