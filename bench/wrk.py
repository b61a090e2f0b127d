"""Closed-loop saturation runs with `wrk` (Debian package `wrk`), when it is installed.

A Python generator spends more CPU per request than a small aiohttp server does, so on a
2-core machine it, not the server, sets the maximum it measures. wrk (C, epoll) costs a
fraction of that. Its latency percentiles (HdrHistogram inside wrk) come from a `done` hook.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

from bench.load import Hook, LoadResult, Target
from bench.procs import BenchError, Processes, log_tail

THREADS = 2

_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("BENCH requests=%d duration_us=%d connect=%d read=%d write=%d "
    .. "status=%d timeout=%d\\n", summary.requests, summary.duration, e.connect, e.read,
    e.write, e.status, e.timeout))
  for _, p in ipairs({50, 90, 99}) do
    io.write(string.format("BENCH p%g=%d\\n", p, latency:percentile(p)))
  end
  io.write(string.format("BENCH max=%d\\n", latency.max))
end
"""


def available() -> bool:
    return shutil.which("wrk") is not None


def script(target: Target) -> str:
    if "]==]" in target.body:
        raise BenchError("request body cannot be quoted for wrk")
    lines = ['wrk.method = "POST"', f"wrk.body = [==[{target.body}]==]"]
    lines += [f'wrk.headers["{k}"] = "{v}"' for k, v in target.headers.items()]
    return "\n".join(lines) + "\n" + _DONE


async def closed_loop(procs: Processes, target: Target, connections: int, duration: float,
                      warmup: float, out_dir: Path,
                      hooks: tuple[Hook, Hook] | None = None) -> LoadResult:
    path = out_dir / f"wrk-{target.name.replace(' ', '-')}.lua"
    path.write_text(script(target))
    if warmup:
        await _wait(procs, _start(procs, path, target.url, connections, warmup))
    proc = _start(procs, path, target.url, connections, duration)
    if hooks:
        hooks[0]()  # after the start, so that wrk's own CPU is counted
    out = await _wait(procs, proc)
    if hooks:
        hooks[1]()
    values = _parse(out)
    errors = {k: values[k] for k in ("connect", "read", "write", "status", "timeout")
              if values.get(k)}
    ok = values["requests"] - values.get("status", 0)
    result = LoadResult(target.name, "closed", connections=connections, duration=duration,
                        warmup=warmup, generators=0, ok=ok, errors=errors,
                        span_s=values["duration_us"] / 1e6)
    result.percentiles = {q: values[f"p{q}"] / 1000 for q in (50, 90, 99)}
    result.percentiles[100] = values["max"] / 1000
    result.driver = f"wrk -t{THREADS} -c{connections}"
    return result


def _start(procs: Processes, script_path: Path, url: str, connections: int,
           seconds: float) -> subprocess.Popen[bytes]:
    argv = ["wrk", f"-t{THREADS}", f"-c{connections}", f"-d{max(1, round(seconds))}s",
            "--timeout", "30s", "-s", str(script_path), url]
    return procs.start("wrk", argv, env={"PATH": "/usr/bin:/bin"}, capture_stdout=True)


async def _wait(procs: Processes, proc: subprocess.Popen[bytes]) -> str:
    stdout, _ = await asyncio.to_thread(proc.communicate)
    if proc.returncode != 0:
        raise BenchError(f"wrk failed ({proc.returncode}):\n{log_tail(procs.logs['wrk'])}")
    return stdout.decode()


def _parse(out: str) -> dict[str, int]:
    values: dict[str, int] = {}
    for line in out.splitlines():
        if line.startswith("BENCH "):
            for item in line.split()[1:]:
                key, _, value = item.partition("=")
                values[key] = int(float(value))
    if "requests" not in values:
        raise BenchError(f"no summary in wrk's output:\n{out[-2000:]}")
    return values
