"""The event loop every Ferry process runs on: uvloop (libuv) where it is installed, which cuts
the per-message cost of the broker and HTTP paths; the standard loop otherwise."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)


class Lifecycle:
    """A service's phases for signal handling: before `started`, SIGTERM/SIGINT cancel the
    start-up (a broker that never answers must not make a process unkillable); after it, the
    first signal asks for a graceful stop and a second one cancels."""

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self.started = False
        self.signalled = False


def raise_open_files_limit() -> None:
    """Every connection is a file: an api holding 10,000 long polls needs more than the usual
    soft limit of 1,024. Raise it to the hard limit the operator allows."""
    with contextlib.suppress(ImportError, ValueError, OSError):
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or hard > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def serve(main: Callable[[Lifecycle], Coroutine[Any, Any, None]]) -> None:
    """Run a service's main coroutine on Ferry's event loop with its signals handled."""
    raise_open_files_limit()

    async def runner() -> None:
        life = Lifecycle()
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            life.signalled = True
            if life.started and not life.stop.is_set():
                life.stop.set()
            else:
                task.cancel()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        try:
            await main(life)
        except asyncio.CancelledError:
            if not life.signalled:
                raise

    run(runner())
