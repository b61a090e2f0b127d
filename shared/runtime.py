"""The event loop every Ferry process runs on: uvloop (libuv) where it is installed, which cuts
the per-message cost of the broker and HTTP paths; the standard loop otherwise."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from shared.logging import get_logger

T = TypeVar("T")

log = get_logger("ferry.runtime")

RECANCEL_EVERY_S = 1.0
STOP_TASK_TIMEOUT_S = 10.0


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


def cancel_requested() -> bool:
    """Whether the running task was asked to stop. A loop that catches errors and goes on
    checks this: a library may turn the cancellation into an error of its own (aiormq does when
    it meets a channel being opened), and the loop would run on."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def wait_set(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait until `event` is set or `timeout_s` has passed (a background loop's pause that a
    stop cuts short); whether it is set."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            await event.wait()
    return event.is_set()


async def stop_task(task: asyncio.Task[Any], *, timeout_s: float = STOP_TASK_TIMEOUT_S) -> None:
    """Cancel a background task and wait until it ended. A cancellation a library swallowed
    is repeated every RECANCEL_EVERY_S; after `timeout_s` the task is left running, with an
    error in the log, rather than hold up the shutdown forever. An error the task ended with is
    raised here, as awaiting it would."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not task.done():
        left = deadline - loop.time()
        if left <= 0:
            log.error("a background task ignored its cancellation; left running",
                      task=task.get_name())
            return
        task.cancel()
        await asyncio.wait([task], timeout=min(RECANCEL_EVERY_S, left))
    if not task.cancelled():
        task.result()


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
