"""Hostile input: one caller's bad request must never fail, stall or slow anyone else's.

One regression test per row of the issue that asked for this, each against real `ferry api`
and `ferry worker` processes: the attacker's request gets a clean 4xx in Anthropic's error
envelope (or, where the request is acceptable after all, a clean answer), and well-formed
requests sent at the same time all succeed. Malformed HTTP is sent over raw sockets.
"""

from __future__ import annotations

import asyncio
import gzip
import re
import uuid
import zlib
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any

import aiohttp
import brotli
import orjson
import pytest
import pytest_asyncio

from tests.acceptance.hostile_support import (
    ASYNC,
    COUNT_TOKENS,
    HANG_GUARD_S,
    MESSAGES,
    RawResponse,
    assert_alive,
    assert_answer_or_refusal,
    assert_clean_error,
    assert_error_envelope,
    brotli_bomb,
    deflate_bomb,
    exchange,
    expect_job_answers,
    final_poll,
    good_call,
    good_submit,
    http_request,
    poll,
    post,
    read_response,
    send_raw,
)
from tests.acceptance.interactive_support import (
    CLIENT_KEY,
    FERRY_HEADERS,
    SMALL_POOLS,
    echo,
    fetch,
    gather_bounded,
    providers_stack,
    unique_model,
)
from tests.acceptance.jobs import unique
from tests.acceptance.stack import Stack
from tests.conftest import TestRun
from tests.support import eventually, fake_calls, free_port, request_body

pytestmark = pytest.mark.acceptance

BODY_TIMEOUT_S = 2  # FERRY_BODY_TIMEOUT of this module's stack: stalled bodies are cut fast
RAW_HEADERS = [("content-type", "application/json"), ("anthropic-version", "2023-06-01")]
KEY = ("x-api-key", CLIENT_KEY)


def providers_toml(stack: Stack) -> str:
    # `down` points at a port nothing listens on: an unreachable provider.
    return f"""
[providers.openai]
type = "openai"
base_url = "{stack.fake_url}/v1"
keys = [{{ key = "sk-a" }}]

[providers.backup]
type = "anthropic"
base_url = "{stack.fake_url}"

[providers.down]
type = "anthropic"
base_url = "http://127.0.0.1:{free_port()}"
max_attempts = 2
"""


@pytest_asyncio.fixture(scope="module")
async def ferry(test_run: TestRun,
                tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    async with providers_stack(test_run, tmp_path_factory.mktemp("ferry-hostile"), "hostile",
                               providers_toml, workers=2,
                               env={**SMALL_POOLS,
                                    "FERRY_BODY_TIMEOUT": str(BODY_TIMEOUT_S)}) as stack:
        yield stack


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    # No connection limit: "concurrent" must mean concurrent, not 100 at a time. The stack
    # closes a connection idle for BODY_TIMEOUT_S (its keep-alive timeout): a pooled one idle
    # about that long could be reused just as the api closes it, and a POST is not retried.
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=BODY_TIMEOUT_S / 4)
    async with aiohttp.ClientSession(connector=connector) as session:
        yield session


# --- requests, and what they leave behind -------------------------------------------------------


def body(text: str, model: str = "claude-hostile", **extra: Any) -> bytes:
    return request_body(text, model=model, **extra)


def model_json(model: str, **extra: Any) -> bytes:
    """A request for `model` (a NUL is written as the escape `\\u0000`, as JSON must)."""
    return body("hostile", model, **extra)


async def job_counts(stack: Stack, model: str) -> dict[tuple[str, str], int]:
    """(mode, status) -> jobs of `model` (async jobs and sync/stream history rows)."""
    rows = await fetch(stack.database_url, "SELECT mode, status, count(*) AS n FROM jobs"
                       " WHERE model = $1 GROUP BY mode, status", model)
    return {(r["mode"], r["status"]): r["n"] for r in rows}


async def wait_for_jobs(stack: Stack, model: str, expected: dict[tuple[str, str], int]) -> None:
    """History is written off the request path, async jobs run later: wait (hang-guarded)
    until the jobs of `model` are exactly `expected`."""
    async def arrived() -> bool:
        return await job_counts(stack, model) == expected
    try:
        await eventually(arrived, timeout=HANG_GUARD_S, interval=0.2,
                         what=f"jobs of {model}: {expected}")
    except AssertionError:
        raise AssertionError(f"jobs of {model}: {await job_counts(stack, model)}, "
                             f"expected {expected}") from None


def interleave(good: Sequence[Awaitable[Any]], bad: Sequence[Awaitable[Any]]
               ) -> list[Awaitable[Any]]:
    """The bad requests spread among the good ones, so they share batches and connections."""
    out = list(good)
    step = max(1, len(good) // (len(bad) + 1))
    for i, coro in enumerate(bad):
        out.insert((i + 1) * step + i, coro)
    return out


async def run_together(good: Sequence[Awaitable[Any]], bad: Sequence[Awaitable[Any]]
                       ) -> tuple[list[Any], list[Any]]:
    """Run all at once; (good results, bad results), each in the order given."""
    tagged_good = [_tag("good", i, c) for i, c in enumerate(good)]
    tagged_bad = [_tag("bad", i, c) for i, c in enumerate(bad)]
    results = await asyncio.gather(*interleave(tagged_good, tagged_bad))
    goods = sorted((i, r) for kind, i, r in results if kind == "good")
    bads = sorted((i, r) for kind, i, r in results if kind == "bad")
    return [r for _, r in goods], [r for _, r in bads]


async def _tag(kind: str, index: int, coro: Awaitable[Any]) -> tuple[str, int, Any]:
    return kind, index, await coro


# --- 1. a NUL in `model` ------------------------------------------------------------------------

NUL_MODELS = ["a\x00", "\x00", "backup/a\x00", "claude\x00opus", "a\x00\x00\x00",
              "openai/\x00gpt", "\x00" * 40, "claude-" + "x" * 300 + "\x00", "m\x00/x", "é\x00"]


async def test_nul_model_submits_do_not_fail_the_submits_they_share_a_batch_with(
    ferry: Stack, http: aiohttp.ClientSession
) -> None:
    model = unique_model("row1-async")
    texts = [unique("good submit") for _ in range(200)]
    good = [good_submit(http, ferry, text, model=model) for text in texts]
    bad = [post(http, ferry.url + MESSAGES, model_json(m), ASYNC) for m in NUL_MODELS]
    job_ids, refusals = await run_together(good, bad)
    for refusal in refusals:
        assert "NUL" in assert_error_envelope(refusal, status=400)["message"]
    await wait_for_jobs(ferry, model, {("async", "completed"): 200})
    await expect_job_answers(http, ferry, dict(zip(job_ids, texts, strict=True)))
    assert_alive(ferry)


async def test_nul_model_requests_do_not_lose_other_requests_history(
    ferry: Stack, http: aiohttp.ClientSession
) -> None:
    model = unique_model("row1-sync")
    good = [good_call(http, ferry, unique("good call"), model=model, stream=i % 2 == 1)
            for i in range(200)]
    bad = [post(http, ferry.url + MESSAGES, model_json(m), FERRY_HEADERS) for m in NUL_MODELS]
    bad += [post(http, ferry.url + MESSAGES, model_json(m, stream=True), FERRY_HEADERS)
            for m in NUL_MODELS]
    _, refusals = await run_together(good, bad)
    for refusal in refusals:
        assert "NUL" in assert_error_envelope(refusal, status=400)["message"]
    await wait_for_jobs(ferry, model, {("sync", "completed"): 100, ("stream", "completed"): 100})
    assert_alive(ferry)


# --- 2. a model name too long for the job index -------------------------------------------------

LONG_MODELS = ["m" * 2700, "claude-" + "x" * 3000, "backup/" + "y" * 2700, "z" * 10_000,
               "€" * 900, "é" * 1400, "openai/" + "🚀" * 700, "m" * 513, "€" * 171,
               "x" * 2704]


async def test_overlong_model_requests_are_refused_alone(
    ferry: Stack, http: aiohttp.ClientSession
) -> None:
    async_model, sync_model = unique_model("row2-async"), unique_model("row2-sync")
    async_texts = [unique("good submit") for _ in range(100)]
    good: list[Awaitable[Any]] = [good_submit(http, ferry, t, model=async_model)
                                  for t in async_texts]
    good += [good_call(http, ferry, unique("good call"), model=sync_model) for _ in range(100)]
    bad = [post(http, ferry.url + MESSAGES, model_json(m), ASYNC) for m in LONG_MODELS]
    bad += [post(http, ferry.url + MESSAGES, model_json(m), FERRY_HEADERS) for m in LONG_MODELS]
    results, refusals = await run_together(good, bad)
    for refusal in refusals:
        assert "at most 512" in assert_error_envelope(refusal, status=400)["message"]
    await wait_for_jobs(ferry, async_model, {("async", "completed"): 100})
    await wait_for_jobs(ferry, sync_model, {("sync", "completed"): 100})
    await expect_job_answers(http, ferry, dict(zip(results[:100], async_texts, strict=True)))
    assert_alive(ferry)


@pytest.mark.parametrize("prefix", ["m", "€" * 160, "backup/"])
async def test_a_model_of_exactly_512_bytes_is_served_and_stored(
    ferry: Stack, http: aiohttp.ClientSession, prefix: str
) -> None:
    tag = unique_model("")
    model = prefix + tag + "x" * (512 - len((prefix + tag).encode()))
    assert len(model.encode()) == 512
    text = unique("at the limit")
    job_id = await good_submit(http, ferry, text, model=model)
    await good_call(http, ferry, unique("at the limit"), model=model)
    await expect_job_answers(http, ferry, {job_id: text})
    await wait_for_jobs(ferry, model, {("async", "completed"): 1, ("sync", "completed"): 1})


# --- 3. a model name of 200,000 characters ------------------------------------------------------


async def test_a_huge_model_name_does_not_break_requests_in_flight(
    ferry: Stack, http: aiohttp.ClientSession
) -> None:
    # The good requests are in flight (the fake holds each for a second) when the attack comes.
    texts = [unique("[[fake:delay=1]] in flight") for _ in range(40)]
    in_flight = [asyncio.create_task(good_call(http, ferry, text, stream=i % 2 == 1))
                 for i, text in enumerate(texts)]

    async def all_started() -> bool:
        calls = await fake_calls(ferry.fake_url)
        return {c["text"] for c in calls} >= set(texts)
    await eventually(all_started, timeout=HANG_GUARD_S, what="the good requests to be in flight")

    huge = "m" * 200_000
    attacks = []
    for model in (huge, "backup/" + huge, "openai/" + huge, "é" * 100_000):
        attacks += [post(http, ferry.url + MESSAGES, model_json(model), FERRY_HEADERS),
                    post(http, ferry.url + MESSAGES, model_json(model, stream=True),
                         FERRY_HEADERS),
                    post(http, ferry.url + MESSAGES, model_json(model), ASYNC),
                    post(http, ferry.url + COUNT_TOKENS, model_json(model), FERRY_HEADERS)]
    for refusal in await asyncio.gather(*attacks):
        assert "at most 512" in assert_error_envelope(refusal, status=400)["message"]
    await asyncio.gather(*in_flight)
    # ... and the api's broker connection is still the same healthy one afterwards.
    await good_call(http, ferry, unique("after the attack"))
    await good_call(http, ferry, unique("after the attack"), stream=True)
    assert_alive(ferry)


async def test_oversized_forwarded_headers_are_refused_not_sent_to_the_broker(
    ferry: Stack, http: aiohttp.ClientSession
) -> None:
    # anthropic-* headers travel with the job: past 16 KB they are refused, below they pass.
    big = {f"anthropic-x-{i}": "v" * 8000 for i in range(3)}
    answer = await post(http, ferry.url + MESSAGES, body(unique("big headers")),
                        {**FERRY_HEADERS, **big})
    assert "at most 16384" in assert_error_envelope(answer, status=400)["message"]
    answer = await post(http, ferry.url + MESSAGES, body(unique("big headers")),
                        {**ASYNC, **big})
    assert_error_envelope(answer, status=400)
    fits = {f"anthropic-x-{i}": "v" * 5000 for i in range(3)}
    text = unique("headers that fit")
    answer = await post(http, ferry.url + MESSAGES, body(text), {**FERRY_HEADERS, **fits})
    assert answer.status == 200 and answer.json()["content"][0]["text"] == echo(text), answer
    await good_call(http, ferry, unique("after big headers"))


# --- 4. numbers beyond 64 bits, through the routes whose workers re-read the body -------------

ODD_NUMBERS = ["1e400", "-1e400", "1e-400", "9" * 4000, "-" + "9" * 4000, "1" + "0" * 30,
               "0.1e99999"]
# Where the number sits: a top-level field Ferry does not know, a content block, a tool schema.
PLACES = {
    "top": ('{{"type": "text", "text": {text}}}', ', "x": {number}'),
    "block": ('{{"type": "text", "text": {text}, "x": {number}}}', ""),
    "tool": ('{{"type": "text", "text": {text}}}',
             ', "tools": [{{"name": "t", "input_schema": {{"type": "object", "properties": '
             '{{"a": {{"type": "number", "maximum": {number}}}}}}}}}]'),
}


def odd_body(model: str, text: str, number: str, place: str, stream: bool = False) -> bytes:
    block, extra = PLACES[place]
    content = block.format(text=orjson.dumps(text).decode(), number=number)
    flag = ', "stream": true' if stream else ""
    return (f'{{"model": {orjson.dumps(model).decode()}, "max_tokens": 64, "messages": '
            f'[{{"role": "user", "content": [{content}]}}]'
            f'{extra.format(number=number)}{flag}}}').encode()


@pytest.mark.parametrize("model", ["claude-hostile", "openai/gpt-4o", "backup/claude-y"])
async def test_numbers_beyond_64_bits_end_promptly_in_every_mode(
    ferry: Stack, http: aiohttp.ClientSession, model: str
) -> None:
    async def sync(number: str, place: str, stream: bool) -> None:
        text = unique(f"odd {place}")
        answer = await post(http, ferry.url + MESSAGES,
                            odd_body(model, text, number, place, stream), FERRY_HEADERS)
        assert_answer_or_refusal(answer, text, stream)

    async def in_async(number: str, place: str) -> None:
        text = unique(f"odd {place}")
        answer = await post(http, ferry.url + MESSAGES, odd_body(model, text, number, place),
                            ASYNC)
        if answer.status != 200:
            assert_clean_error(answer)
            return
        job_id = answer.json()["id"]
        final = await final_poll(http, ferry, job_id)
        assert_answer_or_refusal(final, text, stream=False)
        rows = await fetch(ferry.database_url, "SELECT deliveries FROM jobs WHERE id = $1",
                           _job_uuid(job_id))
        assert [r["deliveries"] for r in rows] == [1], (job_id, rows)  # no worker died on it

    cases: list[Awaitable[None]] = []
    for number in ODD_NUMBERS:
        for place in PLACES:
            cases += [sync(number, place, False), sync(number, place, True),
                      in_async(number, place)]
    await gather_bounded(16, *cases)
    # max_tokens itself beyond 64 bits: an integer >= 0, so the front door takes it.
    for stream in (False, True):
        text = unique("huge max_tokens")
        answer = await post(http, ferry.url + MESSAGES,
                            body(text, model, stream=stream).replace(
                                b'"max_tokens":64', b'"max_tokens":' + b"9" * 4000),
                            FERRY_HEADERS)
        assert_answer_or_refusal(answer, text, stream)
    await good_call(http, ferry, unique("after odd numbers"), model=model)
    assert_alive(ferry)


def _job_uuid(job_id: str) -> uuid.UUID:
    return uuid.UUID(hex=job_id.removeprefix("job_"))


def assert_counted(answer: RawResponse) -> None:
    """count_tokens reached the provider: its count, or its own error relayed (this branch's
    fake provider has no count_tokens endpoint and answers 404)."""
    if answer.status != 200:
        message = assert_clean_error(answer)["message"]
        assert message.startswith("provider `anthropic` answered HTTP"), answer


# --- 5. compressed bodies: bombs, and the encodings clients really send -------------------------

GIB = 1 << 30


@pytest.fixture(scope="module")
def bombs() -> dict[str, bytes]:
    """About 1 MB each (br: a few KB) that inflate to 1 GiB."""
    return {"gzip": deflate_bomb(GIB, "gzip"), "deflate": deflate_bomb(GIB, "deflate"),
            "br": brotli_bomb(GIB)}


async def test_compression_bombs_are_refused_without_slowing_anyone(
    ferry: Stack, http: aiohttp.ClientSession, bombs: dict[str, bytes]
) -> None:
    assert len(bombs["gzip"]) < 2 * 1024 * 1024
    attacks = [(encoding, bombs[encoding]) for encoding in
               ("gzip", "gzip", "gzip", "gzip", "deflate", "br")]
    bad: list[Awaitable[Any]] = []
    for encoding, data in attacks:
        bad += [post(http, ferry.url + MESSAGES, data,
                     {**FERRY_HEADERS, "content-encoding": encoding}),
                post(http, ferry.url + MESSAGES, data,
                     {**ASYNC, "content-encoding": encoding})]
    good: list[Awaitable[Any]] = [good_call(http, ferry, unique("beside a bomb"),
                                            stream=i % 2 == 1) for i in range(10)]
    texts = [unique("submitted beside a bomb") for _ in range(10)]
    good += [good_submit(http, ferry, text) for text in texts]
    results, refusals = await run_together(good, bad)
    for refusal in refusals:
        assert "inflates to more than" in assert_error_envelope(refusal, status=413)["message"]
    await expect_job_answers(http, ferry, dict(zip(results[10:], texts, strict=True)))
    assert_alive(ferry)


def _raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


ENCODERS = {
    "gzip": ("gzip", gzip.compress),
    "x-gzip": ("x-gzip", gzip.compress),
    "GZIP": ("GZIP", gzip.compress),
    "deflate": ("deflate", zlib.compress),
    # body.py: deflate is "also taken raw as browsers send" it
    "deflate-raw": ("deflate", _raw_deflate),
    "br": ("br", brotli.compress),
    "identity": ("identity", lambda data: data),
}


@pytest.mark.parametrize("name", list(ENCODERS))
async def test_compressed_bodies_are_accepted(
    ferry: Stack, http: aiohttp.ClientSession, name: str
) -> None:
    encoding, encode = ENCODERS[name]
    headers = {**FERRY_HEADERS, "content-encoding": encoding}
    text = unique(f"sent as {name}")
    answer = await post(http, ferry.url + MESSAGES, encode(body(text)), headers)
    assert answer.status == 200 and answer.json()["content"][0]["text"] == echo(text), answer
    # Large enough to inflate in several slices (and small enough for the fake's 1 MiB limit).
    text = unique(f"a large body sent as {name}")
    large = body(text, padding="p" * (900 * 1024))
    answer = await post(http, ferry.url + MESSAGES, encode(large), headers)
    assert answer.status == 200 and answer.json()["content"][0]["text"] == echo(text), answer
    text = unique(f"submitted as {name}")
    answer = await post(http, ferry.url + MESSAGES, encode(body(text)),
                        {**ASYNC, "content-encoding": encoding})
    assert answer.status == 200, answer
    await expect_job_answers(http, ferry, {answer.json()["id"]: text})
    assert_counted(await post(http, ferry.url + COUNT_TOKENS, encode(body(text)), headers))


@pytest.mark.parametrize("encoding", ["zstd", "compress", "gzip, br", "gzip;q=1", "*", "7z"])
async def test_an_unknown_content_encoding_is_415(
    ferry: Stack, http: aiohttp.ClientSession, encoding: str
) -> None:
    answer = await post(http, ferry.url + MESSAGES, gzip.compress(body("unknown encoding")),
                        {**FERRY_HEADERS, "content-encoding": encoding})
    assert "not supported" in assert_error_envelope(answer, status=415)["message"]


@pytest.mark.parametrize("data", [b"not gzip at all", gzip.compress(b'{"model": "m"}')[:-9],
                                  b"\x1f\x8b\x08\x00" + b"\x00" * 40, b""],
                         ids=["garbage", "truncated", "bad-deflate", "empty"])
async def test_corrupt_compressed_bodies_are_400(
    ferry: Stack, http: aiohttp.ClientSession, data: bytes
) -> None:
    for headers in (FERRY_HEADERS, ASYNC):
        answer = await post(http, ferry.url + MESSAGES, data,
                            {**headers, "content-encoding": "gzip"})
        assert_error_envelope(answer, status=400)


# --- 6. header values that are not ASCII ---------------------------------------------------------

NON_ASCII = [b"\xff", b"caf\xe9", "clé".encode(), b"\x80\x81\xfe", b"ok\xc3("]
CREDENTIAL_HEADERS = [b"x-api-key", b"authorization"]
FORWARDED_HEADERS = [b"anthropic-beta", b"anthropic-version", b"anthropic-dangerous-direct"]


def raw_body_request(path: str, headers: list[tuple[bytes | str, bytes | str]],
                     data: bytes) -> bytes:
    return http_request("POST", path, [*RAW_HEADERS, *headers], data)


@pytest.mark.parametrize("name", CREDENTIAL_HEADERS + FORWARDED_HEADERS)
async def test_non_ascii_header_bytes_are_never_a_server_error(
    ferry: Stack, http: aiohttp.ClientSession, name: bytes
) -> None:
    good = [good_call(http, ferry, unique("beside odd headers"), stream=i % 2 == 1)
            for i in range(10)]
    attacks, counts = [], []
    for value in NON_ASCII:
        raw_value = b"Bearer " + value if name == b"authorization" else value
        headers: list[tuple[bytes | str, bytes | str]] = [(name, raw_value)]
        if name != b"x-api-key" and name != b"authorization":
            headers.append(("x-api-key", CLIENT_KEY))
        for stream in (False, True):
            attacks.append(exchange(ferry.port, raw_body_request(
                MESSAGES, headers, body(unique("odd header"), stream=stream))))
        attacks.append(exchange(ferry.port, raw_body_request(
            MESSAGES, [*headers, ("x-bf-async", "true")], body(unique("odd header")))))
        counts.append(exchange(ferry.port, raw_body_request(
            COUNT_TOKENS, headers, body(unique("odd header")))))
    _, answers = await run_together(good, attacks + counts)
    for answer in answers:
        if name in FORWARDED_HEADERS:
            assert "must be ASCII" in assert_error_envelope(answer, status=400)["message"]
    if name not in FORWARDED_HEADERS:  # a credential is opaque bytes: hashed, never forwarded
        for answer in answers[:len(attacks)]:
            assert answer.status == 200, answer
        for answer in answers[len(attacks):]:
            assert_counted(answer)
    assert_alive(ferry)


# Ferry's own headers: each value read, none forwarded as is.
OWN_HEADERS = [b"x-ferry-fallbacks", b"x-bf-async", b"x-bf-async-job-result-ttl",
               b"idempotency-key", b"x-bf-async-id", b"content-type", b"content-encoding",
               b"x-bf-async-webhook"]


@pytest.mark.parametrize("name", OWN_HEADERS)
async def test_non_ascii_bytes_in_ferrys_own_headers_are_never_a_server_error(
    ferry: Stack, http: aiohttp.ClientSession, name: bytes
) -> None:
    good = [good_call(http, ferry, unique("beside odd headers"), stream=i % 2 == 1)
            for i in range(10)]
    attacks, values, repeated = [], [], []
    for value in NON_ASCII + [b"backup/" + v for v in NON_ASCII]:
        headers: list[tuple[bytes | str, bytes | str]] = [(name, value), KEY]
        for path, stream in ((MESSAGES, False), (MESSAGES, True), (COUNT_TOKENS, False)):
            attacks.append(exchange(ferry.port, raw_body_request(
                path, headers, body(unique("odd header"), stream=stream))))
            values.append(value)
        # The header twice, the odd value second (found by the fuzz suite: two
        # content-encodings, one not UTF-8, were a 500).
        repeated.append(exchange(ferry.port, raw_body_request(
            MESSAGES, [(name, "true"), (name, value), KEY], body(unique("odd header")))))
        if name != b"x-bf-async":
            attacks.append(exchange(ferry.port, raw_body_request(
                MESSAGES, [*headers, ("x-bf-async", "true")], body(unique("odd header")))))
            values.append(value)
    _, answers = await run_together(good, attacks + repeated)
    for answer in answers[len(attacks):]:
        if answer.status >= 400:
            assert_clean_error(answer)
    for value, answer in zip(values, answers[:len(attacks)], strict=True):
        if name == b"x-ferry-fallbacks" and not _is_utf8(value):
            # A route that is not text names no model any provider could be asked for.
            assert_error_envelope(answer, status=400)
        elif answer.status >= 400:
            assert_clean_error(answer)
        else:
            assert answer.status == 200, answer
    assert_alive(ferry)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


@pytest.mark.parametrize("name", CREDENTIAL_HEADERS)
async def test_a_job_submitted_with_a_non_ascii_credential_is_that_credentials_alone(
    ferry: Stack, name: bytes
) -> None:
    credential = b"Bearer \xffk\xe9y" if name == b"authorization" else b"\xffk\xe9y"
    text = unique("odd credential")
    answer = await exchange(ferry.port, raw_body_request(
        MESSAGES, [(name, credential), ("x-bf-async", "true")], body(text)))
    assert answer.status == 200, answer
    job_id = answer.json()["id"]

    async def poll_raw(headers: list[tuple[bytes | str, bytes | str]]) -> RawResponse:
        return await exchange(ferry.port, raw_body_request(
            MESSAGES, [*headers, ("x-bf-async-id", job_id)], body("poll")))

    async def finished() -> RawResponse | None:
        answer = await poll_raw([(name, credential)])
        assert answer.status == 200, answer
        done = answer.header("x-bf-async-status") not in ("pending", "processing")
        return answer if done else None
    final = await eventually(finished, timeout=HANG_GUARD_S, what=f"job {job_id}")
    assert final.json()["content"][0]["text"] == echo(text), final
    others: list[list[tuple[bytes | str, bytes | str]]] = [
        [(name, credential[:-1])], [("x-api-key", CLIENT_KEY)], []]
    for other in others:
        assert_error_envelope(await poll_raw(other), status=404)


# --- 7. client-chosen model names and the metrics ------------------------------------------------


async def test_distinct_model_names_do_not_grow_the_metrics(
    ferry: Stack, http: aiohttp.ClientSession
) -> None:
    tag = unique_model("row7")
    bad: list[tuple[bytes, dict[str, str]]] = []
    for i in range(250):
        bad.append((model_json(f"{tag}-{i}-" + "x" * 5000), ASYNC))
        bad.append((model_json(f"{tag}-{i}-\x00"), FERRY_HEADERS))
        bad.append((model_json(f"{tag}-{i}-" + "y" * 600, stream=True), FERRY_HEADERS))
        bad.append((model_json(f"{tag}{i}/unknown-provider"), FERRY_HEADERS))
    answers = await gather_bounded(32, *(post(http, ferry.url + MESSAGES, data, headers)
                                         for data, headers in bad))
    for answer in answers:
        assert_error_envelope(answer, status=400)
    # Names the front door accepts are client-chosen too.
    await gather_bounded(16, *(good_call(http, ferry, unique("named"), model=f"{tag}-ok-{i}")
                               for i in range(100)))
    five_mb = [model_json(f"{tag}-big-{i}-" + "z" * (5 * 1024 * 1024)) for i in range(20)]
    answers = await gather_bounded(4, *(post(http, ferry.url + MESSAGES, data, ASYNC)
                                        for data in five_mb))
    for answer in answers:
        assert_error_envelope(answer, status=400)

    # /metrics is on the api's metrics port, not its client port.
    port = re.search(r'"port": (\d+), "event": "metrics served"',
                     ferry.logs["api"].read_text()).group(1)  # type: ignore[union-attr]
    async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
        assert resp.status == 200
        metrics = await resp.text()
    series = [line for line in metrics.splitlines() if line.startswith("ferry_requests_total{")]
    assert 0 < len(series) <= 50, series
    assert tag not in metrics
    assert len(metrics) < 256 * 1024, len(metrics)


# --- 8. malformed HTTP ---------------------------------------------------------------------------

MARK = b"ZQXMARK"  # put in each malformed request; must never come back
GOOD_BODY = request_body("malformed http", model="claude-hostile")


def _chunked(*pieces: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


MALFORMED: dict[str, bytes] = {
    "header-value-too-long": http_request("POST", MESSAGES, [KEY, ("x-long", MARK * 1200)],
                                          GOOD_BODY),
    "header-name-too-long": http_request("POST", MESSAGES, [KEY, (MARK * 1200, "1")],
                                         GOOD_BODY),
    "url-too-long": http_request("POST", MESSAGES.encode() + b"?q=" + MARK * 1200, [KEY],
                                 GOOD_BODY),
    "too-many-headers": http_request("GET", "/", [(f"x-h{i}", MARK) for i in range(200)]),
    "method-with-control-bytes": http_request(b"P\x01ST" + MARK, MESSAGES, [KEY], GOOD_BODY),
    "method-with-space-junk": http_request(b"POST" + MARK + b"\x7f", MESSAGES, [KEY],
                                           GOOD_BODY),
    "content-length-and-chunked": http_request(
        "POST", MESSAGES, [KEY, ("Transfer-Encoding", "chunked")], _chunked(MARK)),
    "bad-chunk-size": http_request("POST", MESSAGES, [KEY, ("Transfer-Encoding", "chunked")],
                                   b"zz" + MARK + b"\r\n" + MARK + b"\r\n0\r\n\r\n",
                                   content_length=False),
    "chunk-longer-than-declared": http_request(
        "POST", MESSAGES, [KEY, ("Transfer-Encoding", "chunked")],
        b"2\r\n" + MARK + b"\r\n0\r\n\r\n", content_length=False),
    "chunk-size-overflow": http_request("POST", MESSAGES, [KEY, ("Transfer-Encoding", "chunked")],
                                        b"f" * 40 + b"\r\n" + MARK + b"\r\n0\r\n\r\n",
                                        content_length=False),
    "transfer-encoding-not-chunked": http_request(
        "POST", MESSAGES, [KEY, ("Transfer-Encoding", b"gzip" + MARK)], GOOD_BODY,
        content_length=False),
    "two-content-lengths": http_request("POST", MESSAGES, [KEY, ("Content-Length", "7")],
                                        GOOD_BODY + MARK),
    "negative-content-length": http_request("POST", MESSAGES, [KEY, ("Content-Length", "-1")],
                                            MARK, content_length=False),
    "content-length-not-a-number": http_request(
        "POST", MESSAGES, [KEY, ("Content-Length", b"12" + MARK)], GOOD_BODY,
        content_length=False),
    "unknown-expectation": http_request("POST", MESSAGES, [KEY, ("Expect", MARK)], GOOD_BODY),
    "nul-in-header-value": http_request("GET", "/", [("x-a", b"a\x00" + MARK)]),
    "space-in-header-name": http_request("GET", "/", [(b"x a" + MARK, "1")]),
    "folded-header-line": http_request("GET", "/", [("x-a", b"1\r\n " + MARK)]),
    "bad-http-version": http_request("GET", "/", [], version=b"HTTP/9." + MARK),
    "non-ascii-path": http_request("POST", MESSAGES.encode() + b"/\xff" + MARK, [KEY],
                                   GOOD_BODY),
}


@pytest.mark.parametrize("name", list(MALFORMED))
async def test_malformed_http_gets_the_envelope_and_no_echo(ferry: Stack, name: str) -> None:
    answer = await exchange(ferry.port, MALFORMED[name])
    assert_error_envelope(answer, marker=MARK)


async def test_bad_chunking_after_the_body_began_is_400_not_a_wait(ferry: Stack) -> None:
    # `Expect: 100-continue` makes the api say when it is reading the body; the bad chunk
    # arrives after that, in a read of its own.
    reader, writer = await asyncio.open_connection("127.0.0.1", ferry.port)
    try:
        async with asyncio.timeout(HANG_GUARD_S):
            writer.write(http_request("POST", MESSAGES, [*RAW_HEADERS, KEY,
                                                         ("Transfer-Encoding", "chunked"),
                                                         ("Expect", "100-continue")],
                                      content_length=False))
            await writer.drain()
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 100 ")
            writer.write(b"5\r\n" + GOOD_BODY[:5] + b"\r\nzz" + MARK + b"\r\n")
            await writer.drain()
            answer = await read_response(reader)
    finally:
        writer.close()
    assert_error_envelope(answer, status=400, marker=MARK)


@pytest.mark.parametrize(("method", "path"), [
    ("DELETE", MESSAGES), ("PUT", "/"), ("PATCH", "/anthropic/v1/models"), ("GET", MESSAGES),
    ("POST", "/nowhere/" + MARK.decode()), ("BREW", "/"), ("OPTIONS", "*"),
])
async def test_wrong_methods_and_paths_get_the_envelope(
    ferry: Stack, method: str, path: str
) -> None:
    assert_error_envelope(await send_raw(ferry.port, method, path, [KEY], GOOD_BODY))


# --- 9. bodies that stall -----------------------------------------------------------------------

STALLED: dict[str, bytes] = {
    "content-length": http_request("POST", MESSAGES, [*RAW_HEADERS, KEY,
                                                      ("Content-Length", "5000")],
                                   GOOD_BODY[:20], content_length=False),
    "chunked": http_request("POST", MESSAGES, [*RAW_HEADERS, KEY,
                                               ("Transfer-Encoding", "chunked")],
                            b"14\r\n" + GOOD_BODY[:20] + b"\r\n", content_length=False),
    "gzip": http_request("POST", MESSAGES, [*RAW_HEADERS, KEY, ("Content-Encoding", "gzip"),
                                            ("Content-Length", "5000")],
                         gzip.compress(GOOD_BODY)[:20], content_length=False),
    "async": http_request("POST", MESSAGES, [*RAW_HEADERS, KEY, ("x-bf-async", "true"),
                                             ("Content-Length", "5000")],
                          GOOD_BODY[:20], content_length=False),
    "count-tokens": http_request("POST", COUNT_TOKENS, [*RAW_HEADERS, KEY,
                                                        ("Content-Length", "5000")],
                                 GOOD_BODY[:20], content_length=False),
    "nothing-sent": http_request("POST", MESSAGES, [*RAW_HEADERS, KEY,
                                                    ("Content-Length", "5000")],
                                 content_length=False),
}


async def test_stalled_bodies_are_cut_with_408_while_others_are_served(
    ferry: Stack, http: aiohttp.ClientSession
) -> None:
    stalled = [asyncio.create_task(exchange(ferry.port, data))
               for data in list(STALLED.values()) * 5]
    # While they hang on, well-formed requests go through.
    await asyncio.gather(*(good_call(http, ferry, unique("beside stalled bodies"),
                                     stream=i % 2 == 1) for i in range(10)))
    job_id = await good_submit(http, ferry, text := unique("submitted beside stalled bodies"))
    for answer in await asyncio.gather(*stalled):
        error = assert_error_envelope(answer, status=408)
        assert error["type"] == "timeout_error", error
    await expect_job_answers(http, ferry, {job_id: text})
    assert_alive(ferry)


async def test_a_stalled_header_block_is_cut_too(ferry: Stack) -> None:
    """A client that never finishes its headers (slowloris) holds a connection as surely as
    one that never finishes its body. The guard is ten times FERRY_BODY_TIMEOUT: a hang
    guard, not a speed requirement."""
    reader, writer = await asyncio.open_connection("127.0.0.1", ferry.port)
    try:
        writer.write(b"POST " + MESSAGES.encode() + b" HTTP/1.1\r\nHost: x\r\nx-api-key: k")
        await writer.drain()
        async with asyncio.timeout(10 * BODY_TIMEOUT_S):
            data = await reader.read()
    except TimeoutError:
        raise AssertionError("the api still held the connection of a client that stalled "
                             f"in its headers after {10 * BODY_TIMEOUT_S} s") from None
    finally:
        writer.close()
    if data:  # an answer is optional; if there is one, it is the envelope
        answer = await read_response(_reader_of(data))
        assert_error_envelope(answer, status=408)


def _reader_of(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


async def test_a_declared_body_over_the_limit_is_413_at_once(ferry: Stack) -> None:
    """No need to wait for 10 GB that could never be taken: Content-Length says it all."""
    answer = await exchange(ferry.port, http_request(
        "POST", MESSAGES, [*RAW_HEADERS, KEY, ("Content-Length", str(10 * GIB))],
        GOOD_BODY[:20], content_length=False))
    assert_error_envelope(answer, status=413)


# --- providers that cannot be reached, and anonymous async submits -------------------------------


async def test_an_unreachable_provider_is_named_without_its_address(
    ferry: Stack, http: aiohttp.ClientSession
) -> None:
    port = _down_port(ferry)
    answers = [await post(http, ferry.url + MESSAGES, body(unique("nobody home"), "down/x"),
                          FERRY_HEADERS),
               await post(http, ferry.url + MESSAGES,
                          body(unique("nobody home"), "down/x", stream=True), FERRY_HEADERS)]
    job_id = (await post(http, ferry.url + MESSAGES, body(unique("nobody home"), "down/x"),
                         ASYNC)).json()["id"]
    answers.append(await final_poll(http, ferry, job_id))
    for answer in answers:
        error = assert_clean_error(answer, low=502, high=502)
        assert error["message"] == "could not reach provider `down` (ClientConnectorError)", \
            error
        assert str(port).encode() not in answer.body, answer
    await good_call(http, ferry, unique("after an unreachable provider"))


def _down_port(stack: Stack) -> int:
    toml = (stack.log_dir / "providers.toml").read_text()
    match = re.search(r'\[providers\.down\][^\[]*base_url = "http://127\.0\.0\.1:(\d+)"', toml)
    assert match is not None, toml
    return int(match.group(1))


async def test_errors_made_by_the_worker_carry_the_request_id_in_the_envelope(
    ferry: Stack, http: aiohttp.ClientSession
) -> None:
    # The envelope is {"type": "error", "error": {...}, "request_id": "req_..."}, as the
    # front door's own errors and Anthropic's are: clients log the body's request_id.
    answer = await post(http, ferry.url + MESSAGES, body(unique("nobody home"), "down/x"),
                        FERRY_HEADERS)
    assert answer.status == 502, answer
    assert answer.json().get("request_id") == answer.header("x-ferry-request-id"), answer


@pytest.mark.parametrize("credentials", [{}, {"x-api-key": ""}, {"authorization": "Bearer "},
                                         {"authorization": "Bearer    "}],
                         ids=["none", "empty-key", "empty-bearer", "blank-bearer"])
async def test_anonymous_async_submits_are_401(
    ferry: Stack, http: aiohttp.ClientSession, credentials: dict[str, str]
) -> None:
    text = unique("anonymous")
    headers = {"content-type": "application/json", "anthropic-version": "2023-06-01",
               "x-bf-async": "true", **credentials}
    answer = await post(http, ferry.url + MESSAGES, body(text), headers)
    assert assert_error_envelope(answer, status=401)["type"] == "authentication_error"
    assert await fake_calls(ferry.fake_url, text) == []
    # ... and without a credential no job can be read either.
    job_id = await good_submit(http, ferry, unique("someone's job"))
    poll_headers = {k: v for k, v in headers.items() if k != "x-bf-async"}
    assert_error_envelope(await poll(http, ferry, job_id, poll_headers), status=404)
