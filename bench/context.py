"""What every scenario gets: the running processes, the database, the report, the run's
options; and the one way a scenario drives load (with the CPU use measured alongside)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from bench import wrk
from bench.cpu import CpuMeter, CpuUse, process_groups
from bench.db import BenchDB
from bench.load import LoadResult, Target, closed_loop, open_loop
from bench.peer import LiteLLM
from bench.procs import Processes, progress
from bench.profile import Profiler
from bench.report import Report
from bench.stack import FerryStack

T = TypeVar("T")
IDLE_CORES = 0.1  # the bench's processes together, between runs


@dataclass
class Bench:
    procs: Processes
    stack: FerryStack
    db: BenchDB
    report: Report
    quick: bool
    workers: int
    peer: LiteLLM | None
    profiler: Profiler | None
    use_wrk: bool = False
    last_cpu: CpuUse | None = None

    def seconds(self, full: float, quick: float) -> float:
        return quick if self.quick else full

    async def settle(self, limit_s: float = 120.0) -> None:
        """Wait until the bench's processes are idle (an overloaded target may still be
        working off its backlog), then empty the fake provider's call log (it keeps every
        call, which would grow its heap and its GC pauses)."""
        await asyncio.sleep(self.seconds(1.0, 0.5))
        deadline = time.monotonic() + limit_s
        while True:
            meter = CpuMeter(self.pids)
            meter.start()
            await asyncio.sleep(0.5)
            busy = meter.stop().own()
            if busy < IDLE_CORES:
                break
            if time.monotonic() > deadline:
                progress(f"  still {busy:.2f} cores busy after {limit_s:g} s; going on")
                break
        await self.stack.clear_fake_calls()

    async def reset(self) -> None:
        """An empty jobs table and empty queues (workers must be stopped first)."""
        await self.stack.purge_queues()
        await self.db.reset()
        await self.stack.clear_fake_calls()

    def pids(self) -> dict[str, list[int]]:
        running = self.procs.running()
        groups = process_groups()  # each child leads its own process group
        named: dict[str, list[int]] = {}
        for name, proc in running.items():
            if name.startswith("loadgen"):
                continue  # the generators report their own CPU
            group = "workers" if name.startswith("worker.") else name
            named.setdefault(group, []).extend(groups.get(proc.pid, [proc.pid]))
        return named

    async def measured(self, run: Callable[[], Awaitable[T]]) -> tuple[T, CpuUse]:
        meter = CpuMeter(self.pids)
        meter.start()
        result = await run()
        return result, meter.stop()

    def window_meter(self) -> tuple[tuple[Callable[[], None], Callable[[], None]], list[CpuUse]]:
        """Hooks for a load run: CPU measured from the end of the warm-up to the last answer."""
        meter = CpuMeter(self.pids)
        used: list[CpuUse] = []
        return (meter.start, lambda: used.append(meter.stop())), used

    async def open(self, scenario: str, target: Target, rate: float, how: str,
                   duration: float | None = None, warmup: float | None = None,
                   label: str | None = None, on_window: Callable[[], None] | None = None,
                   samples: bool = False, record: bool = True) -> LoadResult:
        """Open-loop run, added to the report; `on_window` is called when the measured window
        opens (after the warm-up)."""
        duration = duration if duration is not None else self.seconds(15, 5)
        warmup = warmup if warmup is not None else self.seconds(2, 1)
        progress(f"{scenario}: {label or target.name} open-loop {rate:g} RPS for {duration:g} s")
        hooks, used = self.window_meter()
        if on_window is not None:
            start_meter, window_opened = hooks[0], on_window

            def opened() -> None:
                start_meter()
                window_opened()

            hooks = (opened, hooks[1])
        result = await open_loop(self.procs, target, rate, duration, warmup, hooks=hooks,
                                 samples=samples)
        self._log(result)
        self.last_cpu = used[0]
        if not record:
            return result
        # The generator's own lag (actual − intended send) shows it kept the schedule.
        lag = result.ms(99, "lag")
        cpu = used[0].describe(result.generator_cpu) + (
            f"; generator lag p99 {lag:.1f} ms" if lag is not None else "")
        row = self.report.add_load(scenario, result, how, target=label, cpu=cpu)
        if target.stream:
            row.target = f"{label or target.name}: total"
            first = self.report.add_load(scenario, result, how, which="first",
                                         target=f"{label or target.name}: first event",
                                         cpu=row.cpu)
            # the first-event row goes before the total row
            self.report.latency[-2:] = [first, row]
        return result

    async def closed(self, scenario: str, target: Target, connections: int, how: str,
                     duration: float | None = None, total: int | None = None,
                     label: str | None = None, profile: tuple[str, ...] = (),
                     record: bool = True) -> LoadResult:
        duration = duration if duration is not None else (
            0.0 if total is not None else self.seconds(15, 5))
        warmup = 0.0 if total is not None else self.seconds(2, 1)
        what = f"{total} requests" if total is not None else f"{duration:g} s"
        progress(f"{scenario}: {label or target.name} closed-loop {connections} conns, {what}")

        hooks, used = self.window_meter()
        if self.use_wrk and total is None and not target.stream:
            load = wrk.closed_loop(self.procs, target, connections, duration, warmup,
                                   self.procs.log_dir, hooks=hooks)
        else:
            load = closed_loop(self.procs, target, connections, duration, warmup, total,
                               hooks=hooks)
        if profile and self.profiler is not None:
            pids = {name: self.procs.get(name).pid for name in profile}
            async with self.profiler.record(f"{scenario}, {label or target.name}", pids,
                                            warmup, duration):
                result = await load
        else:
            result = await load
        self._log(result)
        if record:
            self.report.add_load(scenario, result, how, target=label,
                                 cpu=used[0].describe(result.generator_cpu))
        return result

    @staticmethod
    def _log(result: LoadResult) -> None:
        lag = result.ms(99, "lag")
        progress(f"  ok {result.ok}, errors {result.error_count}, "
                 f"{result.achieved_rps:.0f}/s, p50 {result.ms(50)} ms, p99 {result.ms(99)} ms"
                 + (f", generator lag p99 {lag} ms" if result.mode == "open" else "")
                 + (f", generator CPU {result.generator_cpu:.2f} cores"
                    if result.driver == "python" else ""))
