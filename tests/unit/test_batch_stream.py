"""The streaming reader of batch create bodies: the same requests whatever the pieces the body
arrives in, each request's params as the exact bytes sent, and a clear 400 for every malformed
body (never another exception)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from api.batch_stream import BatchParser, BatchRequest
from shared.errors import InvalidRequest


def parse(body: bytes, cuts: list[int] | None = None, **limits: int) -> list[BatchRequest]:
    parser = BatchParser(**limits)
    out: list[BatchRequest] = []
    last = 0
    for cut in sorted(set(cuts or [])):
        out += parser.feed(body[last:cut])
        last = cut
    out += parser.feed(body[last:])
    out += parser.finish()
    return out


def params(text: str = "hi", **extra: object) -> dict[str, object]:
    return {"model": "claude-sonnet-4-5", "max_tokens": 16,
            "messages": [{"role": "user", "content": text}], **extra}


def body(*requests: object) -> bytes:
    return json.dumps({"requests": list(requests)}).encode()


def test_requests_come_out_in_order_with_their_params_bytes() -> None:
    raw_params = ('{"model":"claude-x","max_tokens":1,"temperature":1.0,"n":123456789012345678901,'
                  '"messages":[{"role":"user","content":"caf\\u00e9 \u2603"}],"model":"claude-y"}')
    doc = ('{ "requests" : [ {"custom_id":"a-1","params":' + raw_params + '} ,\n'
           '{"params": {"model": "m", "max_tokens": 2, "messages": [{"role": "user", '
           '"content": "x"}]}, "custom_id": "b_2"} ] , "extra": {"ignored": [1, 2]} }')
    got = parse(doc.encode())
    assert [(r.index, r.custom_id) for r in got] == [(0, "a-1"), (1, "b_2")]
    assert got[0].params == raw_params.encode()  # byte for byte, duplicate key and all
    assert got[0].facts is not None and got[0].facts.model == "claude-y"
    assert got[1].facts is not None and got[1].facts.model == "m"


def test_a_bad_params_errors_only_its_own_request() -> None:
    got = parse(body({"custom_id": "ok", "params": params()},
                     {"custom_id": "bad", "params": {"model": "m", "messages": []}},
                     {"custom_id": "streams", "params": params(stream=True)}))
    assert [r.error for r in got] == [
        None, "max_tokens: Field required", "stream: streaming is not supported in a batch"]


@pytest.mark.parametrize(("doc", "message"), [
    (b"", "request body is empty"),
    (b"[]", "request body must be a JSON object"),
    (b"{}", "requests: Field required"),
    (b'{"requests": []}', "requests: must contain at least one request"),
    (b'{"requests": {}}', "requests: must be an array"),
    (b'{"requests": [1]}', "requests.0: must be an object"),
    (b'{"requests": [{"params": {}}]}', "requests.0.custom_id: Field required"),
    (b'{"requests": [{"custom_id": "a b", "params": {}}]}', "requests.0.custom_id: must be"),
    (b'{"requests": [{"custom_id": 7, "params": {}}]}', "requests.0.custom_id: must be"),
    (b'{"requests": [{"custom_id": "a"}]}', "requests.0.params: Field required"),
    (b'{"requests": [{"custom_id": "a", "params": []}]}', "requests.0.params: must be an obj"),
    (b'{"requests": [{"custom_id": "a", "params": {}}, {"custom_id": "a", "params": {}}]}',
     "requests.1.custom_id: 'a' is used by an earlier request"),
    (b'{"requests": [], "requests": []}', "requests: given more than once"),
    (b'{"requests": [{"custom_id": "a", "params": {}} {"custom_id": "b"}]}',
     "expected ',' or ']' after a request"),
    (b'{"requests": [{"custom_id": "a", "params": {}}]', "it ends before the object is"),
    (b'{"requests": [{"custom_id": "a", "params": {}}]} x', "unexpected data after"),
    (b'{"requests": [{"custom_id": "a", "params": {"x": tru}}]}', "not valid JSON"),
    (b'{"requests": [{"custom_id": "a", "params": {"x": "\xff"}}]}', "not valid UTF-8"),
    (b'{requests: []}', "expected a property name in double quotes"),
])
def test_malformed_bodies_are_a_400_naming_the_fault(doc: bytes, message: str) -> None:
    for cuts in ([], list(range(1, len(doc)))):  # whole, and one byte at a time
        with pytest.raises(InvalidRequest) as raised:
            parse(doc, cuts)
        assert message in raised.value.message


def test_too_many_requests() -> None:
    doc = body(*({"custom_id": f"r{i}", "params": params()} for i in range(4)))
    assert len(parse(doc, max_requests=4)) == 4
    with pytest.raises(InvalidRequest, match="at most 3 requests"):
        parse(doc, max_requests=3)


def test_an_oversized_request_is_refused_without_reading_on() -> None:
    parser = BatchParser(max_request_bytes=1000)
    parser.feed(b'{"requests": [{"custom_id": "a", "params": {"t": "')
    with pytest.raises(InvalidRequest, match="larger than 1000 bytes"):
        for _ in range(100):
            parser.feed(b"x" * 100)


def test_multibyte_characters_split_across_pieces() -> None:
    doc = body({"custom_id": "a", "params": params("héllo ☃ 𝄞")})
    for cut in range(len(doc)):
        got = parse(doc, [cut])
        assert json.loads(got[0].params) == params("héllo ☃ 𝄞")


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False,
                                                                      allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.text("abcXYZ019_-", min_size=1, max_size=64),
                          st.dictionaries(st.text(max_size=8), _json, max_size=5)),
                min_size=1, max_size=8, unique_by=lambda r: r[0]),
       st.lists(st.integers(0, 4000), max_size=12), st.sampled_from([None, 1, 2]))
def test_any_valid_batch_reads_the_same_in_any_pieces(
        requests: list[tuple[str, dict[str, object]]], cuts: list[int],
        indent: int | None) -> None:
    doc = json.dumps({"requests": [{"custom_id": c, "params": p} for c, p in requests]},
                     indent=indent, ensure_ascii=False).encode()
    got = parse(doc, [c for c in cuts if c < len(doc)])
    assert [r.custom_id for r in got] == [c for c, _ in requests]
    assert [json.loads(r.params) for r in got] == [p for _, p in requests]
    for r in got:
        assert r.params in doc  # a slice of the body, not a re-serialisation


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.lists(st.integers(0, 200), max_size=5))
def test_garbage_is_a_400_or_a_batch_never_another_error(
        doc: bytes, cuts: list[int]) -> None:
    try:
        parse(b'{"requests": [' + doc, [c for c in cuts if c < len(doc)])
    except InvalidRequest:
        pass
