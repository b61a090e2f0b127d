"""The fake provider's memory: recorded calls and failure counts."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from fakeprovider.directives import Directives

# The headers kept in `Call.headers`.
RECORDED_HEADERS = ("x-api-key", "authorization", "anthropic-version", "anthropic-beta")


@dataclass
class Call:
    """One recorded request; updated in place while it is answered."""

    id: str
    path: str
    model: str | None = None
    text: str | None = None
    stream: bool = False
    headers: dict[str, str] = field(default_factory=dict)
    status: int | None = None
    finished: bool = False
    cancelled: bool = False


@dataclass
class FakeState:
    calls: list[Call] = field(default_factory=list)
    # How many times each (path, prompt text) has failed, for `fail_times` / `fail_once`.
    failures: dict[tuple[str, str], int] = field(default_factory=dict)

    def failure_status(self, path: str, text: str, directives: Directives) -> int | None:
        """The status this request must fail with, or None to answer normally."""
        status = directives.failure_status
        if status is None or directives.fail_times is None:
            return status
        key = (path, text)
        failed = self.failures.get(key, 0)
        if failed >= directives.fail_times:
            return None
        self.failures[key] = failed + 1
        return status

    def clear(self) -> None:
        """Forget calls and failure counts."""
        self.calls.clear()
        self.failures.clear()


STATE = web.AppKey("fake_state", FakeState)
