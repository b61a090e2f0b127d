"""Stopping background tasks whose libraries swallow a cancellation; a loop's pause that a stop
cuts short."""

from __future__ import annotations

import asyncio

import pytest

from shared import runtime
from shared.runtime import cancel_requested, stop_task, wait_set


async def _loop_converting_cancels(rounds: list[int], *, check: bool,
                                   until: asyncio.Event | None = None) -> None:
    """A refresher loop over a library that turns a cancellation into its own error (as aiormq
    did): it catches errors and goes on, unless it checks whether it was asked to stop."""
    while until is None or not until.is_set():
        try:
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError as exc:
                raise ConnectionError("connection closed") from exc
        except Exception:
            if check and cancel_requested():
                raise asyncio.CancelledError from None
        rounds.append(1)


async def test_a_loop_that_checks_ends_on_the_first_cancel() -> None:
    rounds: list[int] = []
    task = asyncio.create_task(_loop_converting_cancels(rounds, check=True))
    await asyncio.sleep(0.03)
    task.cancel()
    await asyncio.wait([task], timeout=1)
    assert task.cancelled()


async def test_stop_task_cancels_again_a_task_that_swallowed_its_cancel(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "RECANCEL_EVERY_S", 0.05)
    swallowed = 0

    async def swallows_once() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(1)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed += 1

    task = asyncio.create_task(swallows_once())
    await asyncio.sleep(0)
    await asyncio.wait_for(stop_task(task, timeout_s=5), 2)
    assert task.cancelled() and swallowed == 1


async def test_stop_task_gives_up_on_a_task_that_never_ends(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "RECANCEL_EVERY_S", 0.05)
    rounds: list[int] = []
    end = asyncio.Event()
    task = asyncio.create_task(_loop_converting_cancels(rounds, check=False, until=end))
    await asyncio.wait_for(stop_task(task, timeout_s=0.3), 2)
    assert not task.done()  # left running; said in the log
    counted = len(rounds)
    await asyncio.sleep(0.05)
    assert len(rounds) > counted
    end.set()
    await asyncio.wait_for(task, 1)


async def test_stop_task_raises_what_the_task_ended_with() -> None:
    async def fails() -> None:
        raise ValueError("broken")

    task = asyncio.create_task(fails())
    await asyncio.wait([task])
    with pytest.raises(ValueError, match="broken"):
        await stop_task(task)


async def test_a_pause_ends_when_its_time_is_up_or_at_once_when_stopped() -> None:
    stop = asyncio.Event()
    assert await asyncio.wait_for(wait_set(stop, 0.01), 1) is False
    asyncio.get_running_loop().call_later(0.05, stop.set)
    assert await asyncio.wait_for(wait_set(stop, 60), 1) is True
    assert await asyncio.wait_for(wait_set(stop, 60), 1) is True  # already set: no wait
