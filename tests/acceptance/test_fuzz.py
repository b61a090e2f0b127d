"""Fuzzing the front door with hypothesis, against one stack of real processes.

Bodies (valid-ish Messages requests mutated at any depth, arbitrary JSON, arbitrary bytes),
header sets with any bytes, methods and request targets, content encodings and chunked
framing, all sent over raw sockets. Whatever arrives, the answer is never a 5xx (nothing in
this stack fails on its own: the fake provider answers at once and no directive asks it to
fail), an error is always Anthropic's envelope with a request id, a success is a complete
answer, and every process stays up. All the while a well-formed client keeps sending sync,
stream and async requests, and every one of them must succeed.

Hypothesis runs in a worker thread and hands each request to the test's event loop, so the
loop (and the well-formed client on it) keeps running between examples.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, TypeVar

import aiohttp
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.acceptance.fuzz_strategies import (
    HEADERS,
    METHODS,
    BodyCase,
    EncodingCase,
    FramingCase,
    body_cases,
    encoding_cases,
    framing_cases,
    targets,
)
from tests.acceptance.hostile_support import (
    COUNT_TOKENS,
    HANG_GUARD_S,
    MESSAGES,
    RawResponse,
    assert_alive,
    assert_clean_error,
    assert_no_banner,
    exchange,
    expect_job_answers,
    final_poll,
    good_call,
    good_submit,
    http_request,
)
from tests.acceptance.interactive_support import (
    CLIENT_KEY,
    SMALL_POOLS,
    echo,
    gather_bounded,
    parse_sse,
    providers_stack,
)
from tests.acceptance.jobs import unique
from tests.acceptance.stack import Stack
from tests.conftest import TestRun
from tests.support import request_body

pytestmark = [
    pytest.mark.acceptance,
    # Deeply nested bodies make long example reprs; hypothesis says so for each one.
    pytest.mark.filterwarnings("ignore:Generating overly large repr"),
]

BODY_TIMEOUT_S = 2  # a fuzzed framing that leaves the body unfinished is cut after this
# The same examples on every run (a CI run must not fail on a case no change introduced);
# FERRY_FUZZ_EXPLORE=1 draws new ones, which is how new cases are found.
FUZZ = settings(deadline=None, database=None, print_blob=True,
                derandomize=not os.environ.get("FERRY_FUZZ_EXPLORE"),
                suppress_health_check=list(HealthCheck))
BASE_HEADERS: list[tuple[bytes | str, bytes | str]] = [
    ("content-type", "application/json"), ("anthropic-version", "2023-06-01"),
    ("x-api-key", CLIENT_KEY)]

T = TypeVar("T")


def providers_toml(stack: Stack) -> str:
    return f"""
[providers.openai]
type = "openai"
base_url = "{stack.fake_url}/v1"
keys = [{{ key = "sk-a" }}]

[providers.backup]
type = "anthropic"
base_url = "{stack.fake_url}"
"""


@pytest_asyncio.fixture(scope="module")
async def ferry(test_run: TestRun,
                tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    async with providers_stack(test_run, tmp_path_factory.mktemp("ferry-fuzz"), "fuzz",
                               providers_toml, workers=2,
                               env={**SMALL_POOLS,
                                    "FERRY_BODY_TIMEOUT": str(BODY_TIMEOUT_S)}) as stack:
        yield stack


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    # Shorter than the stack's keep-alive timeout (BODY_TIMEOUT_S), so that a pooled
    # connection is never reused just as the api closes it.
    connector = aiohttp.TCPConnector(keepalive_timeout=BODY_TIMEOUT_S / 4)
    async with aiohttp.ClientSession(connector=connector) as session:
        yield session


# --- the well-formed client beside the fuzz ----------------------------------------------------


class SteadyClient:
    """Well-formed requests one after another (sync, stream, async in turn) while a test
    fuzzes; each failure is kept with its request, for the test to report."""

    def __init__(self, stack: Stack, http: aiohttp.ClientSession) -> None:
        self._stack = stack
        self._http = http
        self._stop = asyncio.Event()
        self.succeeded = 0
        self.failures: list[str] = []
        self.jobs: dict[str, str] = {}

    async def run(self) -> None:
        n = 0
        while not self._stop.is_set():
            text = unique("steady client")
            try:
                if n % 3 == 2:
                    self.jobs[await good_submit(self._http, self._stack, text)] = text
                else:
                    await good_call(self._http, self._stack, text, stream=n % 3 == 1)
                self.succeeded += 1
            except Exception as exc:  # kept, and asserted on when the test ends
                self.failures.append(f"request {n} ({text!r}): {exc!r}")
            n += 1

    def stop(self) -> None:
        self._stop.set()

    async def stop_and_check(self, task: asyncio.Task[None]) -> None:
        self.stop()
        await task
        assert not self.failures, "\n".join(self.failures[:10])
        assert self.succeeded > 0
        await expect_job_answers(self._http, self._stack, self.jobs)


@contextlib.asynccontextmanager
async def steady_client(stack: Stack, http: aiohttp.ClientSession
                        ) -> AsyncIterator[SteadyClient]:
    client = SteadyClient(stack, http)
    task = asyncio.create_task(client.run())
    try:
        yield client
    except BaseException:
        client.stop()  # the test failed already: that failure is the one to report
        await task
        raise
    await client.stop_and_check(task)


async def fuzz(strategy: st.SearchStrategy[T],
               check: Callable[[T], Coroutine[Any, Any, RawResponse]],
               max_examples: int) -> None:
    """Run `check` on `max_examples` cases of `strategy` (hypothesis in a worker thread,
    each check on this event loop); `check` returns the answer it checked. Prints how many
    answers had each status (`pytest -s` shows it)."""
    loop = asyncio.get_running_loop()
    statuses: Counter[int] = Counter()

    @settings(FUZZ, max_examples=max_examples)
    @given(case=strategy)
    def run(case: T) -> None:
        answer = asyncio.run_coroutine_threadsafe(check(case), loop).result(2 * HANG_GUARD_S)
        statuses[answer.status] += 1

    try:
        await asyncio.to_thread(run)
    finally:
        print(f"statuses of {sum(statuses.values())} fuzzed requests: "
              f"{dict(sorted(statuses.items()))}")


# --- what every answer must be -------------------------------------------------------------------


def check_answer(answer: RawResponse, *, head: bool = False) -> None:
    """Never a 5xx; always Ferry's request id and no banner; an error in the envelope; a
    success complete (a stream ends with message_stop)."""
    assert answer.status < 500, answer
    assert_no_banner(answer)
    assert (answer.header("x-ferry-request-id") or "").startswith("req_"), answer
    if head:
        return
    if answer.status >= 400:
        assert_clean_error(answer)
        return
    assert answer.status == 200, answer
    content_type = answer.header("content-type") or ""
    if content_type.startswith("text/event-stream"):
        assert parse_sse(answer.body)[-1][0] == "message_stop", answer
    elif content_type.startswith("application/json"):
        answer.json()
    else:
        assert content_type.startswith("text/plain"), answer  # /metrics


async def send(port: int, method: bytes | str, target: bytes | str,
               headers: list[tuple[bytes | str, bytes | str]], body: bytes) -> RawResponse:
    return await exchange(port, http_request(method, target, headers, body))


# --- bodies ---------------------------------------------------------------------------------


async def test_fuzzed_bodies(ferry: Stack, http: aiohttp.ClientSession) -> None:
    jobs: list[str] = []

    async def check(case: BodyCase) -> RawResponse:
        headers = [*BASE_HEADERS, *([("x-bf-async", "true")] if case.is_async else [])]
        answer = await send(ferry.port, "POST", case.path, headers, case.body)
        check_answer(answer)
        if case.is_async and answer.status == 200:
            assert answer.header("x-bf-async-status") == "pending", answer
            jobs.append(answer.json()["id"])
        return answer

    async with steady_client(ferry, http):
        await fuzz(body_cases(), check, max_examples=700)

    async def settled(job_id: str) -> None:  # every accepted job ends, and not in a 5xx
        check_answer(await final_poll(http, ferry, job_id))
    await gather_bounded(8, *(settled(job_id) for job_id in jobs))
    assert_alive(ferry)


# --- headers --------------------------------------------------------------------------------


async def test_fuzzed_headers(ferry: Stack, http: aiohttp.ClientSession) -> None:
    cases = st.tuples(HEADERS, st.sampled_from([MESSAGES, MESSAGES, COUNT_TOKENS]),
                      st.booleans())

    async def check(case: tuple[list[tuple[bytes, bytes]], str, bool]) -> RawResponse:
        fuzzed, path, stream = case
        names = {name.lower() for name, _ in fuzzed}
        headers: list[tuple[bytes | str, bytes | str]] = [
            *fuzzed, *((n, v) for n, v in BASE_HEADERS if str(n).encode() not in names)]
        body = request_body("fuzzed headers", stream=stream)
        answer = await send(ferry.port, "POST", path, headers, body)
        check_answer(answer)
        return answer

    async with steady_client(ferry, http):
        await fuzz(cases, check, max_examples=500)
    assert_alive(ferry)


# --- methods and request targets ------------------------------------------------------------


async def test_fuzzed_methods_and_targets(ferry: Stack, http: aiohttp.ClientSession) -> None:
    good = request_body("fuzzed target")
    cases = st.tuples(METHODS, targets(), st.sampled_from([b"", good, b"\x00\xff{"]))

    async def check(case: tuple[bytes, bytes, bytes]) -> RawResponse:
        method, target, body = case
        answer = await send(ferry.port, method, target, BASE_HEADERS, body)
        check_answer(answer, head=method == b"HEAD")
        return answer

    async with steady_client(ferry, http):
        await fuzz(cases, check, max_examples=400)
    assert_alive(ferry)


# --- content encodings and chunked framing ---------------------------------------------------


async def test_fuzzed_content_encodings(ferry: Stack, http: aiohttp.ClientSession) -> None:
    text = "an encoded body"
    body = request_body(text)

    async def check(case: EncodingCase) -> RawResponse:
        headers = [*BASE_HEADERS,
                   *([("content-encoding", case.header)] if case.header is not None else [])]
        answer = await send(ferry.port, "POST", MESSAGES, headers, case.data)
        check_answer(answer)
        if case.intact:  # well encoded and well named: the provider's answer
            assert answer.status == 200, answer
            assert answer.json()["content"][0]["text"] == echo(text), answer
        return answer

    async with steady_client(ferry, http):
        await fuzz(encoding_cases(body), check, max_examples=300)
    assert_alive(ferry)


async def test_fuzzed_chunked_framing(ferry: Stack, http: aiohttp.ClientSession) -> None:
    text = "a chunked body"
    body = request_body(text, stream=False)
    head = (b"POST " + MESSAGES.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Connection: close\r\ncontent-type: application/json\r\n"
            b"x-api-key: " + CLIENT_KEY.encode() + b"\r\n")

    async def check(case: FramingCase) -> RawResponse:
        answer = await exchange(ferry.port, case.request)
        check_answer(answer)
        if case.fault is None:
            assert answer.status == 200, answer
            assert answer.json()["content"][0]["text"] == echo(text), answer
        elif case.fault == "no-last-chunk":
            assert answer.status == 408, answer
        return answer

    async with steady_client(ferry, http):
        await fuzz(framing_cases(head, body), check, max_examples=150)
    assert_alive(ferry)
