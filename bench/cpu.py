"""Where the CPU went during a run: per process (from /proc/PID/stat) and for the whole machine
(/proc/stat), in cores. The machine is shared, so "other" (busy minus everything named) shows
how much of it went to work that is not the bench's."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


def _proc_ticks(pid: int) -> int | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[11]) + int(fields[12])  # utime + stime


def _pids_named(comm: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == comm:
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def process_groups() -> dict[int, list[int]]:
    """pgid -> pids: a child's own children (uvicorn workers, say) share its group."""
    groups: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                pgrp = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[2])
            except (OSError, IndexError, ValueError):
                continue
            groups.setdefault(pgrp, []).append(int(entry.name))
    return groups


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies over all cores."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])
    return total - idle, total


SHARED = ("rabbitmq", "postgres(all)")


def shared_services() -> dict[str, list[int]]:
    """RabbitMQ and PostgreSQL serve everyone on this machine, not just the bench."""
    return {"rabbitmq": _pids_named("beam.smp"), "postgres(all)": _pids_named("postgres")}


@dataclass
class CpuUse:
    wall_s: float
    cores: dict[str, float]  # name -> cores used on average
    machine_busy: float  # cores
    machine_cores: int

    def own(self) -> float:
        """Cores used by the bench's own children (not the shared services)."""
        return sum(v for k, v in self.cores.items() if k not in SHARED)

    def describe(self, generator_cores: float = 0.0) -> str:
        named = sum(self.cores.values()) + generator_cores
        parts = [f"{name} {value:.2f}" for name, value in self.cores.items() if value >= 0.01]
        if generator_cores:
            parts.append(f"loadgen {generator_cores:.2f}")
        other = max(0.0, self.machine_busy - named)
        return (f"busy {self.machine_busy:.2f}/{self.machine_cores}: " + ", ".join(parts)
                + f", other {other:.2f}")


class CpuMeter:
    def __init__(self, pids: Callable[[], dict[str, list[int]]]) -> None:
        self._pids = pids
        self._start: dict[int, int] = {}
        self._names: dict[str, list[int]] = {}
        self._t0 = 0.0
        self._m0 = (0, 0)

    def start(self) -> None:
        self._names = {**self._pids(), **shared_services()}
        self._start = {pid: t for pids in self._names.values() for pid in pids
                       if (t := _proc_ticks(pid)) is not None}
        self._t0 = time.monotonic()
        self._m0 = _machine_ticks()

    def stop(self) -> CpuUse:
        wall = time.monotonic() - self._t0
        busy1, total1 = _machine_ticks()
        # Processes started during the run count from zero (their ticks start at their start).
        for name, pids in {**self._pids(), **shared_services()}.items():
            known = self._names.setdefault(name, [])
            known.extend(pid for pid in pids if pid not in known)
        cores = {}
        for name, pids in self._names.items():
            used = 0
            for pid in pids:
                end = _proc_ticks(pid)
                if end is not None:
                    used += end - self._start.get(pid, 0)
            cores[name] = used / TICKS / wall if wall else 0.0
        ncores = os.cpu_count() or 1
        busy = (busy1 - self._m0[0]) / max(1, total1 - self._m0[1]) * ncores
        return CpuUse(wall, cores, busy, ncores)
