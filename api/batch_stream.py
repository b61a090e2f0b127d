"""Reading a Message Batches create body as it arrives: `{"requests": [{custom_id, params}, …]}`
up to 256 MB, without ever holding it as one parsed object.

The body is decoded incrementally and each element of `requests` is read with the standard
library's JSON scanner (C) as soon as it is complete, then handed out and dropped: memory is
bounded by the largest single request, not the batch. Each request's `params` is also handed
out as the exact bytes the client sent, so a provider receives every byte as written (numbers
beyond 64 bits, key order, escapes), as on the Messages endpoint. No streaming JSON library
gives the raw text of a value; the standard scanner does, through the index it returns.

Structure errors (not JSON, `requests` not an array of objects, a bad or repeated
`custom_id`, too many requests) refuse the whole batch; a `params` that is not a valid
Messages request makes only its own request errored, as on Anthropic.
"""

from __future__ import annotations

import codecs
import json
import re
from dataclasses import dataclass
from typing import Any

from api.validation import RequestFacts, check_request
from shared.errors import InvalidRequest

MAX_REQUESTS = 100_000
CUSTOM_ID = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_WS = " \t\n\r"
_SCAN = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class BatchRequest:
    index: int
    custom_id: str
    params: bytes  # exactly as sent
    facts: RequestFacts | None  # None when `error` says why params is not a Messages request
    error: str | None = None


class _Incomplete(Exception):
    """The buffered text ends inside a value: read more."""


class BatchParser:
    """Feed the body in pieces; each call returns the requests completed by that piece."""

    def __init__(self, max_requests: int = MAX_REQUESTS,
                 max_request_bytes: int = 32 * 1024 * 1024) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("strict")
        self._text = ""
        self._pieces: list[str] = []  # decoded, not yet joined onto the text
        self._pieces_len = 0
        self._pos = 0
        self._consumed = 0  # characters dropped from the front of the buffer
        self._state = "start"
        self._retry_at = 0  # buffer length at which a failed scan is worth trying again
        self._eof = False
        self._max_requests = max_requests
        self._max_request_chars = max_request_bytes
        self._seen_requests = False
        self._custom_ids: set[str] = set()
        self.count = 0

    def feed(self, data: bytes) -> list[BatchRequest]:
        self._add(data, final=False)
        buffered = len(self._text) + self._pieces_len
        if buffered < self._retry_at and buffered - self._pos <= self._max_request_chars:
            return []
        self._join()
        return self._run()

    def finish(self) -> list[BatchRequest]:
        """End of the body: the last requests, or InvalidRequest if the JSON is incomplete."""
        self._add(b"", final=True)
        self._join()
        self._eof = True
        out = self._run()
        if self._state != "end":
            if self._state == "start" and not self._text.strip():
                raise InvalidRequest("request body is empty; expected {\"requests\": [...]}")
            raise InvalidRequest("request body is not valid JSON: it ends before the "
                                 "object is complete")
        if not self._seen_requests:
            raise InvalidRequest("requests: Field required")
        if not self.count:
            raise InvalidRequest("requests: must contain at least one request")
        return out

    def _add(self, data: bytes, final: bool) -> None:
        try:
            piece = self._decoder.decode(data, final)
        except UnicodeDecodeError:
            raise InvalidRequest("request body is not valid UTF-8") from None
        if piece:
            self._pieces.append(piece)
            self._pieces_len += len(piece)

    def _join(self) -> None:
        if self._pieces:
            self._text = self._text + "".join(self._pieces)
            self._pieces.clear()
            self._pieces_len = 0

    # --- the state machine -------------------------------------------------------------------

    def _run(self) -> list[BatchRequest]:
        out: list[BatchRequest] = []
        try:
            while self._step(out):
                pass
        except _Incomplete:
            pending = len(self._text) - self._pos
            if pending > self._max_request_chars + 1024:
                raise InvalidRequest(
                    f"requests.{self.count}: larger than {self._max_request_chars} bytes, or "
                    "not valid JSON") from None
            # Scanning again from the same place only pays once the buffer has doubled.
            self._retry_at = len(self._text) + max(pending, 64 * 1024)
        if self._pos > 1 << 20 or self._pos > len(self._text) // 2:
            self._consumed += self._pos
            self._text = self._text[self._pos:]
            self._retry_at = max(0, self._retry_at - self._pos)
            self._pos = 0
        return out

    def _step(self, out: list[BatchRequest]) -> bool:
        """Advance over one token or value; False when nothing more can be read now."""
        i = self._skip(self._pos)
        if i >= len(self._text):
            if self._eof or self._state == "end":
                return False
            raise _Incomplete
        char = self._text[i]
        state = self._state
        if state == "end":
            raise self._error(i, "unexpected data after the JSON object")
        if state == "start":
            if char != "{":
                raise InvalidRequest(
                    "request body must be a JSON object: {\"requests\": [...]}")
            self._pos, self._state = i + 1, "first_key"
        elif state in ("first_key", "key"):
            if char == "}" and state == "first_key":
                self._pos, self._state = i + 1, "end"
            elif char != '"':
                raise self._error(i, "expected a property name in double quotes")
            else:
                key, end = self._scan(i)
                j = self._skip(end)
                if j >= len(self._text):
                    raise _Incomplete
                if self._text[j] != ":":
                    raise self._error(j, "expected ':' after a property name")
                self._pos = j + 1
                self._state = "requests" if key == "requests" else "value"
                if key == "requests":
                    if self._seen_requests:
                        raise InvalidRequest("requests: given more than once")
                    self._seen_requests = True
        elif state == "value":  # another top-level member: read and ignore it
            _, end = self._scan(i)
            self._pos, self._state = end, "after_member"
        elif state == "after_member":
            if char == ",":
                self._pos, self._state = i + 1, "key"
            elif char == "}":
                self._pos, self._state = i + 1, "end"
            else:
                raise self._error(i, "expected ',' or '}' after a property value")
        elif state == "requests":
            if char != "[":
                raise InvalidRequest("requests: must be an array of {custom_id, params}")
            self._pos, self._state = i + 1, "first_item"
        elif state in ("first_item", "item"):
            if char == "]" and state == "first_item":
                self._pos, self._state = i + 1, "after_member"
            else:
                out.append(self._request(i))
                self._state = "after_item"
        elif state == "after_item":
            if char == ",":
                self._pos, self._state = i + 1, "item"
            elif char == "]":
                self._pos, self._state = i + 1, "after_member"
            else:
                raise self._error(i, "expected ',' or ']' after a request")
        return True

    def _request(self, i: int) -> BatchRequest:
        """Read one element of `requests` starting at `i` (its members one by one, so the raw
        text of `params` is known)."""
        index = self.count
        where = f"requests.{index}"
        if self.count >= self._max_requests:
            raise InvalidRequest(f"requests: at most {self._max_requests} requests in a batch")
        if self._text[i] != "{":
            self._scan(i)  # the whole value first: a JSON fault in it is the error to name
            raise InvalidRequest(f"{where}: must be an object with custom_id and params")
        members: dict[str, tuple[Any, int, int]] = {}
        j = self._skip(i + 1)
        self._need(j)
        if self._text[j] == "}":
            end = j + 1
        else:
            while True:
                self._need(j)
                if self._text[j] != '"':
                    raise self._error(j, "expected a property name in double quotes")
                key, k = self._scan(j)
                k = self._skip(k)
                self._need(k)
                if self._text[k] != ":":
                    raise self._error(k, "expected ':' after a property name")
                start = self._skip(k + 1)
                self._need(start)
                value, stop = self._scan(start)
                members[key] = (value, start, stop)  # the last one wins, as in every parser
                j = self._skip(stop)
                self._need(j)
                if self._text[j] == ",":
                    j = self._skip(j + 1)
                    continue
                if self._text[j] == "}":
                    end = j + 1
                    break
                raise self._error(j, "expected ',' or '}' after a property value")
        custom_id = members.get("custom_id", (None, 0, 0))[0]
        if custom_id is None:
            raise InvalidRequest(f"{where}.custom_id: Field required")
        if not isinstance(custom_id, str) or not CUSTOM_ID.fullmatch(custom_id):
            raise InvalidRequest(f"{where}.custom_id: must be 1 to 64 letters, digits, '_' or "
                                 "'-'")
        if custom_id in self._custom_ids:
            raise InvalidRequest(f"{where}.custom_id: {custom_id!r} is used by an earlier "
                                 "request; custom_id must be unique within a batch")
        if "params" not in members:
            raise InvalidRequest(f"{where}.params: Field required")
        params, start, stop = members["params"]
        if not isinstance(params, dict):
            raise InvalidRequest(f"{where}.params: must be an object (a Messages request)")
        raw = self._text[start:stop].encode()
        self._pos = end
        self._custom_ids.add(custom_id)
        self.count += 1
        try:
            facts = check_request(params)
        except InvalidRequest as exc:
            return BatchRequest(index, custom_id, raw, None, exc.message)
        if facts.stream:
            return BatchRequest(index, custom_id, raw, None,
                                "stream: streaming is not supported in a batch")
        return BatchRequest(index, custom_id, raw, facts)

    # --- scanning ------------------------------------------------------------------------------

    def _scan(self, i: int) -> tuple[Any, int]:
        try:
            value, end = _SCAN(self._text, i)
        except StopIteration:
            if not self._eof:
                raise _Incomplete from None
            raise self._error(i, "expected a JSON value") from None
        except json.JSONDecodeError as exc:
            if not self._eof:
                raise _Incomplete from None
            raise self._error(exc.pos, exc.msg) from None
        except RecursionError:
            raise self._error(i, "nested too deeply") from None
        if end >= len(self._text) and not self._eof:
            raise _Incomplete  # a number at the end may go on in the next piece
        return value, end

    def _need(self, i: int) -> None:
        if i >= len(self._text):
            if not self._eof:
                raise _Incomplete
            raise self._error(i, "unexpected end of the body")

    def _skip(self, i: int) -> int:
        text = self._text
        while i < len(text) and text[i] in _WS:
            i += 1
        return i

    def _error(self, i: int, what: str) -> InvalidRequest:
        return InvalidRequest(f"request body is not valid JSON: {what} (at character "
                              f"{self._consumed + i})")
