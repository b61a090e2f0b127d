"""What a fault run measures, reusable by the tests and by a benchmark.

`AsyncJobLoad` submits async jobs at a steady rate (open loop: the schedule does not wait for
answers, so a stalled gateway meets the load it would meet in production), each job with a
prompt text of its own so the fake provider's calls can be counted per job. `wait_final` polls
every acknowledged job until it is final or the hang guard passes. `upstream_calls` counts the
fake provider's calls per text. `FaultOutcome` holds it all, says which of Ferry's promises
broke, and prints the one-line summary. (Sync and stream requests: `replies.py`.)
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import aiohttp
import orjson

from tests.support import fake_calls, request_body

API_KEY = "fault-test-key"
MESSAGES = "/anthropic/v1/messages"
FINAL = ("completed", "failed")
CLIENT_TIMEOUT_S = 30.0  # per request: an answer that takes longer counts as none


@dataclass
class Submit:
    """One async submit and what came back."""

    index: int
    text: str
    sent_at: float  # time.monotonic()
    answered_at: float | None = None
    status: int | None = None  # None: no HTTP answer (see `error`)
    body: Any = None  # the answer's JSON, or its text when it is not JSON
    job_id: str | None = None
    error: str | None = None  # a transport error, or no answer within the client timeout

    @property
    def acknowledged(self) -> bool:
        return self.status == 200 and self.job_id is not None


def is_error_envelope(body: Any) -> bool:
    """Anthropic's `{"type": "error", "error": {"type": ..., "message": ...}}`."""
    if not isinstance(body, dict) or body.get("type") != "error":
        return False
    error = body.get("error")
    return (isinstance(error, dict) and isinstance(error.get("type"), str)
            and isinstance(error.get("message"), str))


def decode(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw.decode(errors="replace")


class AsyncJobLoad:
    """`async with AsyncJobLoad(url, "label", rate=100) as load:` submits from entry until the
    block ends (or `max_seconds`), then waits for the answers still due. `directive` is put
    before each text (a `[[fake:...]]` for the fake provider), or `directive(n)` before the
    n-th."""

    def __init__(self, base_url: str, label: str, *, rate: float,
                 directive: str | Callable[[int], str] = "",
                 api_key: str = API_KEY, client_timeout: float = CLIENT_TIMEOUT_S,
                 max_seconds: float = 900.0) -> None:
        self.url = base_url + MESSAGES
        self.label = label
        self.rate = rate
        self.directive = directive
        self.api_key = api_key
        self.client_timeout = client_timeout
        self.max_seconds = max_seconds
        self.submits: list[Submit] = []
        self._numbers = itertools.count()
        self._in_flight: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None
        self._schedule: asyncio.Task[None] | None = None

    async def __aenter__(self) -> AsyncJobLoad:
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        self._schedule = asyncio.create_task(self._run_schedule())
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        assert self._schedule is not None and self._session is not None
        try:
            await self._schedule
            if self._in_flight:  # each is bounded by the client timeout
                await asyncio.wait(set(self._in_flight))
        finally:
            await self._session.close()

    @property
    def acknowledged(self) -> list[Submit]:
        return [s for s in self.submits if s.acknowledged]

    async def run_for(self, seconds: float) -> None:
        """Let the load go on for `seconds` (a length of load, not a wait for anything)."""
        await asyncio.sleep(seconds)

    async def until_acknowledged_after(self, since: float, within: float) -> bool:
        """Until a submit sent at or after `since` (time.monotonic()) is acknowledged; False
        if none is within `within` seconds (a hang guard: the summary then says so)."""
        deadline = time.monotonic() + within
        while not any(s.acknowledged and s.sent_at >= since for s in self.submits):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    def burst(self, n: int) -> list[Submit]:
        """`n` submits at once, beside the steady rate; their records fill in as they answer."""
        return [self._send() for _ in range(n)]

    async def _run_schedule(self) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        for i in itertools.count():
            due = start + i / self.rate
            if due - start > self.max_seconds:
                return
            if due > loop.time():
                await asyncio.sleep(due - loop.time())
            if self._stop.is_set():
                return
            self._send()

    def _send(self) -> Submit:
        number = next(self._numbers)
        directive = self.directive(number) if callable(self.directive) else self.directive
        text = f"{directive} fault {self.label} {number} {uuid.uuid4().hex}".strip()
        submit = Submit(number, text, time.monotonic())
        self.submits.append(submit)
        task = asyncio.create_task(self._submit(submit))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)
        return submit

    async def _submit(self, submit: Submit) -> None:
        assert self._session is not None
        headers = {"x-api-key": self.api_key, "x-bf-async": "true",
                   "content-type": "application/json"}
        try:
            async with self._session.post(
                self.url, data=request_body(submit.text), headers=headers,
                timeout=aiohttp.ClientTimeout(total=self.client_timeout),
            ) as resp:
                raw = await resp.read()
                submit.status, submit.body = resp.status, decode(raw)
        except TimeoutError:
            submit.error = f"no answer within {self.client_timeout:g}s"
        except aiohttp.ClientError as exc:
            submit.error = f"{type(exc).__name__}: {exc}"
        finally:
            submit.answered_at = time.monotonic()
        if submit.status == 200 and isinstance(submit.body, dict):
            job_id = submit.body.get("id")
            if isinstance(job_id, str) and job_id.startswith("job_"):
                submit.job_id = job_id


@dataclass
class Final:
    """What the last poll of a job said."""

    status: str  # completed | failed | pending | processing | missing (404) | unknown
    http_status: int | None = None
    seen_at: float | None = None  # when it was first seen final


async def wait_final(base_url: str, submits: Iterable[Submit], *, deadline: float,
                     api_key: str = API_KEY, interval: float = 0.25,
                     concurrency: int = 16) -> dict[str, Final]:
    """Poll each acknowledged job until it is completed, failed or not found, or until
    `deadline` (time.monotonic()), a hang guard; returns the last answer per job id. Polls
    that fail (the store down, say) are tried again in the next round."""
    finals = {s.job_id: Final("unknown") for s in submits if s.job_id is not None}
    slots = asyncio.Semaphore(concurrency)
    url = base_url + MESSAGES
    body = request_body("poll")

    async def poll(http: aiohttp.ClientSession, job_id: str) -> None:
        headers = {"x-api-key": api_key, "x-bf-async-id": job_id,
                   "content-type": "application/json"}
        async with slots:
            try:
                async with http.post(url, data=body, headers=headers,
                                     timeout=aiohttp.ClientTimeout(total=10)) as resp:
                    await resp.read()
                    status = resp.headers.get("x-bf-async-status")
                    if resp.status == 404:
                        status = "missing"
            except (TimeoutError, aiohttp.ClientError):
                return
        if status is not None:
            final = status in (*FINAL, "missing")
            finals[job_id] = Final(status, resp.status, time.monotonic() if final else None)

    async with aiohttp.ClientSession() as http:
        while True:
            todo = [j for j, f in finals.items() if f.seen_at is None]
            if not todo:
                return finals
            await asyncio.gather(*(poll(http, job_id) for job_id in todo))
            if time.monotonic() > deadline:
                return finals
            await asyncio.sleep(interval)


async def upstream_calls(fake_url: str) -> Counter[str]:
    """How many times the fake provider was called with each prompt text."""
    return Counter(c["text"] for c in await fake_calls(fake_url) if c["text"] is not None)


async def upstream_in_flight(fake_url: str, label: str) -> int:
    """Calls the fake provider is answering now for texts containing `label`."""
    return sum(1 for c in await fake_calls(fake_url)
               if c["text"] and label in c["text"] and not c["finished"] and not c["cancelled"])


@dataclass
class FaultOutcome:
    """A fault run's record: the submits, the final state of each acknowledged job, the
    upstream calls per text, and when the fault ended."""

    fault: str
    submits: list[Submit]
    finals: dict[str, Final]
    calls: Counter[str]
    fault_end: float  # time.monotonic()
    # A submit without any HTTP answer is a broken promise, except where this says the
    # process that should have answered was dead (the api-kill fault).
    no_answer_expected: Callable[[Submit], bool] = field(default=lambda submit: False)

    @property
    def acknowledged(self) -> list[Submit]:
        return [s for s in self.submits if s.acknowledged]

    def with_status(self, *statuses: str) -> list[Submit]:
        return [s for s in self.acknowledged if self.finals[s.job_id].status in statuses]  # type: ignore[index]

    @property
    def lost(self) -> list[Submit]:
        """Acknowledged, yet not finished when the hang guard ran out (or not found)."""
        return [s for s in self.acknowledged if self.finals[s.job_id].status not in FINAL]  # type: ignore[index]

    @property
    def unclean(self) -> list[Submit]:
        """Answers other than an acknowledgement that are not a 4xx/5xx error envelope."""
        bad = []
        for s in self.submits:
            if s.acknowledged:
                continue
            if s.status is None:
                if not self.no_answer_expected(s):
                    bad.append(s)
            elif not (400 <= s.status < 600 and is_error_envelope(s.body)):
                bad.append(s)
        return bad

    def over_called(self, limit: int = 2) -> list[Submit]:
        return [s for s in self.acknowledged if self.calls[s.text] > limit]

    @property
    def duplicated(self) -> list[Submit]:
        return [s for s in self.acknowledged if self.calls[s.text] > 1]

    @property
    def ghost_calls(self) -> int:
        """Upstream calls for submits the client was not told were accepted."""
        return sum(self.calls[s.text] for s in self.submits if not s.acknowledged)

    @property
    def recovered_s(self) -> float | None:
        """From the fault's end to the first acknowledgement of a submit sent after it."""
        times = [s.answered_at for s in self.acknowledged
                 if s.sent_at >= self.fault_end and s.answered_at is not None]
        return min(times) - self.fault_end if times else None

    @property
    def settled_s(self) -> float | None:
        """From the fault's end until every acknowledged job was seen final (None if some
        never were). Bounded below by how long the load ran on after the fault."""
        seen = [self.finals[s.job_id].seen_at for s in self.acknowledged]  # type: ignore[index]
        if not seen or any(t is None for t in seen):
            return None
        return max(t for t in seen if t is not None) - self.fault_end

    def summary(self) -> str:
        def secs(value: float | None) -> str:
            return "never" if value is None else f"{value:.1f}s"

        calls = [self.calls[s.text] for s in self.acknowledged]
        refused = Counter(s.status for s in self.submits if not s.acknowledged)
        refused_text = ",".join(f"{k or 'none'}:{v}" for k, v in sorted(
            refused.items(), key=lambda kv: kv[0] or 0)) or "-"
        return (
            f"FAULT {self.fault}: submitted={len(self.submits)}"
            f" acknowledged={len(self.acknowledged)}"
            f" completed={len(self.with_status('completed'))}"
            f" failed={len(self.with_status('failed'))} lost={len(self.lost)}"
            f" duplicated={len(self.duplicated)} max_calls={max(calls, default=0)}"
            f" ghost_calls={self.ghost_calls} refused={refused_text}"
            f" unclean={len(self.unclean)} recovered={secs(self.recovered_s)}"
            f" settled={secs(self.settled_s)}"
        )

    def broken_promises(self, max_calls: int = 2) -> list[str]:
        """What went wrong, one line per promise with a few examples; empty if none."""
        broken = []

        def examples(subs: list[Submit], show: Callable[[Submit], str]) -> str:
            return "; ".join(show(s) for s in subs[:5]) + (" ..." if len(subs) > 5 else "")

        def state(s: Submit) -> str:
            return f"{s.job_id} {self.finals[s.job_id].status}"  # type: ignore[index]

        if self.lost:
            broken.append(f"{len(self.lost)} acknowledged jobs never finished: "
                          + examples(self.lost, state))
        if failed := self.with_status("failed"):
            broken.append(f"{len(failed)} acknowledged jobs failed with a healthy upstream: "
                          + examples(failed, state))
        if over := self.over_called(max_calls):
            broken.append(f"{len(over)} jobs ran upstream more than {max_calls} times: "
                          + examples(over, lambda s: f"{s.job_id} x{self.calls[s.text]}"))
        if unclean := self.unclean:
            broken.append(f"{len(unclean)} answers were not an acknowledgement nor an error "
                          "envelope: " + examples(
                              unclean, lambda s: f"{s.status or s.error} {str(s.body)[:120]}"))
        if self.recovered_s is None:
            broken.append("no submit sent after the fault ended was acknowledged")
        return broken


async def measure(fault: str, load: AsyncJobLoad, base_url: str, fake_url: str, *,
                  fault_end: float, hang_guard_s: float,
                  no_answer_expected: Callable[[Submit], bool] | None = None) -> FaultOutcome:
    """Wait for every acknowledged job (at most `hang_guard_s` after the fault's end), count
    the upstream calls, print the summary line and return the outcome."""
    finals = await wait_final(base_url, load.submits, deadline=fault_end + hang_guard_s,
                              api_key=load.api_key)
    outcome = FaultOutcome(fault, load.submits, finals, await upstream_calls(fake_url),
                           fault_end)
    if no_answer_expected is not None:
        outcome.no_answer_expected = no_answer_expected
    print(outcome.summary())
    return outcome


