"""A real HTTP server receiving Ferry's webhooks in the test process: it records every request
and answers each endpoint (a path) from a script: statuses, a status with headers, or `HANG`
(no answer until the test releases it)."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from standardwebhooks.webhooks import Webhook

HANG = "hang"
Answer = int | str | tuple[int, dict[str, str]]


@dataclass(frozen=True)
class Received:
    headers: dict[str, str]
    body: bytes
    at: float  # time.time() when it arrived

    @property
    def id(self) -> str:
        return self.headers["webhook-id"]

    def verify(self, secret: str) -> Any:
        """The payload, once the Standard Webhooks reference implementation accepted the
        signature (it raises otherwise)."""
        return Webhook(secret).verify(self.body, self.headers)


class Receiver:
    def __init__(self) -> None:
        self.base_url = ""
        self.requests: dict[str, list[Received]] = defaultdict(list)
        self.hanging: dict[str, int] = defaultdict(int)
        self._scripts: dict[str, list[Answer]] = {}
        self._released: dict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self._changed = asyncio.Condition()

    def url(self, name: str) -> str:
        return f"{self.base_url}/hook/{name}"

    def script(self, name: str, *answers: Answer) -> None:
        """Answers for the next requests to `name`, in order; 200 once they are used up."""
        self._scripts[name] = list(answers)

    def release(self, name: str) -> None:
        """Let every hanging request to `name` answer 200."""
        self._released[name].set()

    async def wait_for(self, name: str, count: int, timeout: float = 30.0  # noqa: ASYNC109
                       ) -> list[Received]:
        """Until `name` got `count` requests (a hang guard, not a speed check)."""
        await self._wait(lambda: len(self.requests[name]) >= count, timeout,
                         f"{count} requests to {name}")
        return list(self.requests[name])

    async def wait_hanging(self, name: str, count: int,
                           timeout: float = 30.0) -> None:  # noqa: ASYNC109
        await self._wait(lambda: self.hanging[name] >= count, timeout,
                         f"{count} hanging requests to {name}")

    async def _wait(self, done: Any, timeout: float, what: str) -> None:  # noqa: ASYNC109
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(done), timeout)
            except TimeoutError:
                raise AssertionError(f"gave up after {timeout}s waiting for {what}; got "
                                     f"{dict(self.requests)}") from None

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        received = Received({k.lower(): v for k, v in request.headers.items()},
                            await request.read(), time.time())
        self.requests[name].append(received)
        script = self._scripts.get(name) or []
        answer: Answer = script.pop(0) if script else 200
        await self._notify()
        if answer == HANG:
            self.hanging[name] += 1
            await self._notify()
            try:
                await self._released[name].wait()
            finally:
                self.hanging[name] -= 1
            answer = 200
        status, headers = answer if isinstance(answer, tuple) else (int(answer), {})
        return web.Response(status=status, text=f"receiver says {status}", headers=headers)


@asynccontextmanager
async def running_receiver() -> AsyncIterator[Receiver]:
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/hook/{name}", receiver.handle)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        receiver.base_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        yield receiver
    finally:
        for name in list(receiver.hanging):
            receiver.release(name)
        await runner.cleanup()
