"""Scenario 5: the sweeper on a backlog of expired results, and what it does to async submit
latency while it runs."""

from __future__ import annotations

import asyncio
import time

from bench.context import Bench
from bench.procs import progress
from bench.report import fmt_rate
from bench.scenarios.submit import ferry_submit

SUBMIT_RATE = 100
POLL_S = 0.05
OPEN_HOW = "open-loop, latency from intended send time; no workers running"


class SweepClock:
    """Wall-clock times of the sweep: spawned, first seen holding its lock, results gone."""

    def __init__(self) -> None:
        self.spawned: float | None = None
        self.locked: float | None = None
        self.empty: float | None = None
        self.started = asyncio.Event()


async def run_sweeper(b: Bench) -> None:
    scenario = "5 sweeper"
    rows = 100_000 if b.quick else 1_000_000
    duration = b.seconds(15, 5)
    b.stack.stop_workers()
    await b.reset()
    progress(f"{scenario}: inserting {rows} jobs with expired results")
    started = time.monotonic()
    await b.db.seed_expired(rows)
    progress(f"  seeded in {time.monotonic() - started:.1f} s")
    await b.settle()

    await b.open(scenario, ferry_submit(b), SUBMIT_RATE, OPEN_HOW, duration=duration,
                 label="ferry async submit, no sweep")
    await b.settle()

    # The sweeper starts when the measured window opens; the submits due while it sweeps
    # (from taking its lock to an empty job_results) are the "during" figure.
    clock = SweepClock()

    def spawn() -> None:
        clock.spawned = time.time()
        b.stack.start_sweeper({"FERRY_SWEEP_INTERVAL": "1"})
        clock.started.set()

    watcher = asyncio.create_task(_watch(b, clock))
    result = await b.open(scenario, ferry_submit(b), SUBMIT_RATE, OPEN_HOW, duration=duration,
                          on_window=spawn, samples=True, record=False)
    await watcher
    b.stack.stop_sweeper()
    assert clock.spawned is not None and clock.empty is not None
    begin = clock.locked or clock.spawned
    during = result.subset(begin, clock.empty)
    cpu = b.last_cpu.describe(result.generator_cpu) if b.last_cpu else ""
    row = b.report.add_load(scenario, during, OPEN_HOW, target="ferry async submit, during sweep",
                            cpu=cpu)
    row.duration = f"{clock.empty - begin:.2f} s (the sweep, within a {duration:g} s run)"
    row.errors = ", ".join(f"{k}×{v}" for k, v in result.errors.items()) or "0"
    row.compare = f"{during.ok} requests due during the sweep"
    sweep_s = clock.empty - begin
    b.report.figure(scenario, "expired results deleted/s", f"{fmt_rate(rows / sweep_s)}/s",
                    f"{rows} expired rows, FERRY_SWEEP_BATCH=5000, {SUBMIT_RATE} RPS submits "
                    "alongside", f"{sweep_s:.2f} s",
                    "rows / (sweeper first holds its advisory lock → job_results empty; "
                    f"polled every {POLL_S} s); spawn → empty "
                    f"{clock.empty - clock.spawned:.2f} s")
    await b.reset()


async def _watch(b: Bench, clock: SweepClock) -> None:
    from worker.sweeper import SWEEPER_LOCK_KEY  # the key the sweeper holds while it sweeps

    await clock.started.wait()
    while True:
        locked, left = await b.db.sweep_state(SWEEPER_LOCK_KEY)
        now = time.time()
        if locked and clock.locked is None:
            clock.locked = now
        if not left:
            clock.empty = now
            return
        b.procs.check_alive("sweeper")
        await asyncio.sleep(POLL_S)
