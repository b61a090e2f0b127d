"""`--profile`: sample a process with py-spy during a measured window and say where its CPU
went, by function and by library. Raw stacks and a flamegraph stay in bench/.logs/."""

from __future__ import annotations

import asyncio
import shutil
import sys
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from bench.load import START_DELAY_S
from bench.procs import Processes, progress

# Leaf frames are charged to the first of these whose marker is in the frame's file name.
LIBRARIES = (
    ("aio_pika/aiormq/pamqp (AMQP client)", ("aio_pika", "aiormq", "pamqp")),
    ("asyncpg (PostgreSQL client)", ("asyncpg",)),
    ("aiohttp (HTTP server/client)", ("aiohttp", "multidict", "yarl")),
    ("pydantic (validation)", ("pydantic",)),
    ("structlog/logging", ("structlog", "logging")),
    ("prometheus_client (metrics)", ("prometheus_client",)),
    ("orjson/json", ("orjson", "json")),
    ("asyncio event loop", ("asyncio", "selectors")),
    ("ferry: api/", ("api/",)),
    ("ferry: shared/", ("shared/",)),
    ("ferry: worker/", ("worker/",)),
)
TOP = 15


class Profiler:
    def __init__(self, procs: Processes, out_dir: Path) -> None:
        self._procs = procs
        self._out = out_dir
        self._pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        self.summaries: list[str] = []

    def available(self) -> bool:
        return Path(self._pyspy).exists()

    @asynccontextmanager
    async def record(self, run: str, pids: dict[str, int], warmup: float, duration: float
                     ) -> AsyncIterator[None]:
        """Sample each process for `duration` seconds, starting after the load's warm-up."""
        raws = {name: self._out / f"profile-{_slug(run)}-{name}.txt" for name in pids}
        tasks = [asyncio.create_task(self._sample(name, pid, raws[name],
                                                  START_DELAY_S + warmup, duration))
                 for name, pid in pids.items()]
        try:
            yield
        finally:
            await asyncio.gather(*tasks)
        for name, raw in raws.items():
            self.summaries.append(summarize(f"{name} during {run}", raw))
            progress(f"profile of {name} during {run}: {raw}")

    async def _sample(self, name: str, pid: int, raw: Path, delay: float,
                      duration: float) -> None:
        await asyncio.sleep(delay)
        proc = self._procs.start(f"py-spy.{name}", [
            self._pyspy, "record", "--pid", str(pid), "--duration", str(max(1, int(duration))),
            "--rate", "200", "--format", "raw", "--nonblocking", "--output", str(raw)],
            env={"PATH": "/usr/bin:/bin"})
        await asyncio.to_thread(proc.wait)


def summarize(name: str, raw: Path) -> str:
    """Top functions by own samples, and own samples per library, as Markdown."""
    own: Counter[str] = Counter()
    total = 0
    try:
        lines = raw.read_text().splitlines()
    except OSError:
        return f"profile {name}: no samples ({raw} missing)"
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        leaf = stack.rsplit(";", 1)[-1]
        own[_strip_line(leaf)] += int(count)
        total += int(count)
    if not total:
        return f"profile {name}: no samples"
    libraries: Counter[str] = Counter()
    for frame, n in own.items():
        libraries[_library(frame)] += n
    out = [f"**py-spy profile of {name}** ({total} samples of running or runnable stacks; "
           "C code, such as the event loop's own loop, Cython drivers and socket syscalls, "
           "is charged to the Python frame that called it)\n",
           "| own samples | library |", "|--:|---|"]
    out += [f"| {n / total:.0%} | {lib} |" for lib, n in libraries.most_common()]
    out += ["", "| own samples | function |", "|--:|---|"]
    out += [f"| {n / total:.1%} | `{frame}` |" for frame, n in own.most_common(TOP)]
    return "\n".join(out) + "\n"


def _strip_line(frame: str) -> str:
    # "send (aio_pika/channel.py:123)" -> "send (aio_pika/channel.py)"
    head, sep, tail = frame.rpartition(":")
    return f"{head})" if sep and tail.rstrip(")").isdigit() else frame


def _library(frame: str) -> str:
    where = frame.rsplit("(", 1)[-1]
    for label, markers in LIBRARIES:
        if any(m in where for m in markers):
            return label
    return "other"


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text)
