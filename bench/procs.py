"""Child processes of the bench: each in its own process group with its own log file, and every
one of them ended on the way out (normal exit, exception, Ctrl-C, SIGTERM, or the bench dying).
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from shared.runtime import raise_open_files_limit

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PR_SET_PDEATHSIG = 1
LOG_TAIL_CHARS = 3000


class BenchError(RuntimeError):
    pass


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the bench dies, even by SIGKILL."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass  # not Linux/glibc: the bench's own cleanup still runs


def progress(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def log_tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
    except OSError:
        return ""


class Processes:
    """Registry of running children by name."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, Path] = {}

    def start(self, name: str, argv: list[str], env: dict[str, str],
              capture_stdout: bool = False) -> subprocess.Popen[bytes]:
        old = self._procs.get(name)
        if old is not None and old.poll() is None:
            raise BenchError(f"process {name!r} is already running")
        path = self.log_dir / f"{name}.log"
        log = path.open("ab")
        try:
            proc = subprocess.Popen(
                argv, cwd=PROJECT_ROOT, env=env, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if capture_stdout else log,
                stderr=log if capture_stdout else subprocess.STDOUT,
                # The bench starts children from its main thread only (PDEATHSIG is per thread).
                start_new_session=True, preexec_fn=_die_with_parent,  # noqa: PLW1509
            )
        finally:
            log.close()  # the child holds its own copy
        self._procs[name] = proc
        self.logs[name] = path
        return proc

    def get(self, name: str) -> subprocess.Popen[bytes]:
        return self._procs[name]

    def running(self, prefix: str = "") -> dict[str, subprocess.Popen[bytes]]:
        return {n: p for n, p in self._procs.items()
                if n.startswith(prefix) and p.poll() is None}

    def check_alive(self, name: str) -> None:
        proc = self._procs[name]
        if proc.poll() is not None:
            raise BenchError(f"{name} exited with {proc.returncode}; log tail:\n"
                             f"{log_tail(self.logs[name])}")

    def stop(self, name: str, timeout: float = 15.0) -> int | None:
        return self.stop_many([name], timeout).get(name)

    def stop_many(self, names: list[str], timeout: float = 15.0) -> dict[str, int | None]:
        """SIGTERM to each process group, then SIGKILL to whatever is left after `timeout`."""
        procs = {n: self._procs[n] for n in names if n in self._procs}
        for proc in procs.values():
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in procs.values():
            try:
                proc.wait(timeout=max(0.05, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(timeout=10)
        for proc in procs.values():
            _signal_group(proc, signal.SIGKILL)  # grandchildren left in the group, if any
            if proc.stdout is not None:
                proc.stdout.close()
        return {n: p.returncode for n, p in procs.items()}

    def stop_all(self, timeout: float = 15.0) -> None:
        self.stop_many(list(self._procs), timeout)


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


async def wait_http(url: str, procs: Processes, name: str, timeout_s: float = 60.0) -> None:
    """Poll `url` until it answers 200; fail at once if the process behind it exits."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while time.monotonic() < deadline:
            procs.check_alive(name)
            try:
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return
                    last = f"HTTP {resp.status}: {(await resp.text())[:200]}"
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                last = type(exc).__name__
            await asyncio.sleep(0.1)
    raise BenchError(f"{name} not ready at {url} after {timeout_s:g} s ({last}); log tail:\n"
                     f"{log_tail(procs.logs[name])}")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def peak_rss_mib(pid: int) -> float | None:
    """VmHWM (peak resident set) of a live process, in MiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def rss_mib(pid: int) -> float | None:
    """VmRSS (resident set now) of a live process, in MiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def raise_fd_limit() -> None:
    """Children inherit it: 10,000 jobs in flight hold that many sockets in several processes."""
    raise_open_files_limit()
