"""A PostgreSQL cluster and a RabbitMQ node of the fault run's own, which its tests may stop,
kill and start again; the machine's own servers, shared with other runs, are never touched.

Both are named after the run (`ferryfault_<run id>`) and live while the run holds its lock
file; a run killed before its teardown leaves them behind with the lock free, and the next run
removes them (`remove_leftovers`). PostgreSQL clusters come from Debian's postgresql-common
(`pg_createcluster`); the RabbitMQ node from `rmq-node.sh` beside this file. Both need root.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

PREFIX = "ferryfault"
RMQ_NODE_SCRIPT = Path(__file__).with_name("rmq-node.sh")
COMMAND_TIMEOUT_S = 180.0  # a hang guard for pg_ctlcluster / rabbitmqctl, not an expectation
_RUNS_DIR = Path(tempfile.gettempdir()) / f"{PREFIX}-runs"


class ServiceError(RuntimeError):
    pass


async def run_command(*cmd: str, timeout: float = COMMAND_TIMEOUT_S) -> str:  # noqa: ASYNC109
    """Run `cmd`; its output, or ServiceError with the output when it fails or hangs."""
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise ServiceError(f"{' '.join(cmd)} did not finish in {timeout:g}s") from None
    text = out.decode(errors="replace")
    if proc.returncode:
        raise ServiceError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{text}")
    return text


def missing_tools() -> str | None:
    """Why the private servers cannot be made here, or None."""
    if os.geteuid() != 0:
        return "fault tests start their own PostgreSQL cluster and RabbitMQ node: run as root"
    for tool in ("pg_createcluster", "pg_ctlcluster", "pg_dropcluster", "pg_lsclusters",
                 "pg_config", "runuser"):
        if shutil.which(tool) is None:
            return f"fault tests need {tool} (postgresql-common) on PATH"
    if subprocess.run([str(RMQ_NODE_SCRIPT), "check"], check=False).returncode != 0:
        return ("fault tests need RabbitMQ's rabbitmq-server and rabbitmqctl (set RMQ_BIN to "
                "their directory, RMQ_COOKIE_HOME to the rabbitmq user's home)")
    return None


# --- the run's lock, and what dead runs left -------------------------------------------------


@dataclass
class RunLock:
    """An exclusive flock held while the run lives; the kernel drops it when the process dies,
    however it dies."""

    run_id: str
    _file: IO[bytes] | None = field(default=None, repr=False)

    @property
    def path(self) -> Path:
        return _RUNS_DIR / f"{self.run_id}.lock"

    def acquire(self) -> None:
        _RUNS_DIR.mkdir(exist_ok=True)
        self._file = self.path.open("wb")
        fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def release(self) -> None:
        if self._file is not None:
            self.path.unlink(missing_ok=True)
            self._file.close()
            self._file = None


def _run_is_alive(run_id: str) -> bool:
    path = _RUNS_DIR / f"{run_id}.lock"
    try:
        with path.open("rb") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
        path.unlink(missing_ok=True)
    except FileNotFoundError:
        pass
    return False


async def remove_leftovers(current_run_id: str) -> list[str]:
    """Drop the clusters and nodes of fault runs that died before their teardown."""
    removed = []
    for line in (await run_command("pg_lsclusters", "--no-header")).splitlines():
        version, name = line.split()[:2]
        run_id = name.removeprefix(f"{PREFIX}_")
        if run_id != name and run_id != current_run_id and not _run_is_alive(run_id):
            await run_command("pg_dropcluster", "--stop", version, name)
            removed.append(f"PostgreSQL cluster {version}/{name}")
    for directory in rabbit_directories():
        run_id = directory.name.removeprefix(f"{PREFIX}-rmq-")
        if run_id != current_run_id and not _run_is_alive(run_id):
            await run_command(str(RMQ_NODE_SCRIPT), "destroy", str(directory))
            removed.append(f"RabbitMQ node in {directory}")
    return removed


def rabbit_directory(run_id: str) -> Path:
    return Path(tempfile.gettempdir()) / f"{PREFIX}-rmq-{run_id}"


def rabbit_directories() -> list[Path]:
    return sorted(Path(tempfile.gettempdir()).glob(f"{PREFIX}-rmq-*"))


# --- PostgreSQL ------------------------------------------------------------------------------


async def installed_postgres_version() -> str:
    """The major version pg_config names (postgresql-common points it at the newest)."""
    out = await run_command("pg_config", "--version")  # "PostgreSQL 15.20 (Debian ...)"
    return out.split()[1].split(".")[0]


@dataclass
class PrivatePostgres:
    """A cluster made by pg_createcluster, trust auth for 127.0.0.1, never started at boot."""

    name: str
    port: int
    version: str

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    async def create(self) -> None:
        await run_command(
            "pg_createcluster", self.version, self.name, "--port", str(self.port),
            "--start-conf", "manual",
            "--", "--auth=trust")
        await self.start()

    async def start(self) -> None:
        """Returns once the server accepts connections (pg_ctl waits for it)."""
        await run_command("pg_ctlcluster", self.version, self.name, "start")

    async def stop(self) -> None:
        """`-m immediate`: every backend is dropped at once, with no goodbye to clients and no
        shutdown checkpoint, and the next start runs crash recovery. This is what a crash or a
        failover looks like to Ferry; `fast` would end sessions politely first."""
        await run_command("pg_ctlcluster", self.version, self.name, "stop", "-m", "immediate")

    async def kill(self) -> None:
        """SIGKILL to the postmaster and its children, as when the machine dies."""
        postmaster = await self._postmaster_pid()
        if postmaster is None:
            return
        doomed = [postmaster, *_children(postmaster)]
        for pid in doomed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        # Until they are gone (reaped): a start that finds the postmaster's pid still alive
        # refuses to run beside it.
        deadline = asyncio.get_running_loop().time() + COMMAND_TIMEOUT_S
        while any(_exists(pid) for pid in doomed):
            if asyncio.get_running_loop().time() > deadline:
                raise ServiceError(f"PostgreSQL processes {doomed} outlived SIGKILL")
            await asyncio.sleep(0.05)

    @contextlib.asynccontextmanager
    async def down(self) -> AsyncIterator[None]:
        """Stopped inside the block; started again on the way out, whatever happened."""
        await self.stop()
        try:
            yield
        finally:
            await self.start()

    async def drop(self) -> None:
        await run_command("pg_dropcluster", "--stop", self.version, self.name)

    async def _postmaster_pid(self) -> int | None:
        out = await run_command("pg_lsclusters", "--no-header", self.version, self.name)
        data_dir = Path(out.split()[5])
        try:
            return int((data_dir / "postmaster.pid").read_text().split()[0])
        except FileNotFoundError:
            return None


def _exists(pid: int) -> bool:
    """Alive, or dead and not yet reaped."""
    return Path(f"/proc/{pid}").exists()


def _children(parent: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)"
            if int(fields[1]) == parent:
                found.append(int(stat.parent.name))
    return found


# --- RabbitMQ --------------------------------------------------------------------------------


@dataclass
class PrivateRabbit:
    """One standalone node (`rmq-node.sh`); its data directory outlives stop and kill, so
    durable queues and their messages survive them."""

    directory: Path
    name: str
    port: int
    dist_port: int

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    async def _script(self, command: str, *args: str) -> str:
        return await run_command(str(RMQ_NODE_SCRIPT), command, str(self.directory), *args)

    async def start(self) -> None:
        """Start (or start again, data kept) and return once the node takes connections."""
        await self._script("start", self.name, str(self.port), str(self.dist_port))

    async def stop(self) -> None:
        """A graceful stop: clients are told the connection is closing (320)."""
        await self._script("stop")

    async def kill(self) -> None:
        await self._script("kill")

    @contextlib.asynccontextmanager
    async def down(self) -> AsyncIterator[None]:
        """Stopped inside the block; started again on the way out, whatever happened."""
        await self.stop()
        try:
            yield
        finally:
            await self.start()

    async def destroy(self) -> None:
        await self._script("destroy")

    async def ctl(self, *args: str) -> str:
        return await self._script("ctl", *args)

    async def close_connections_from(self, local_ports: set[int], reason: str) -> int:
        """Close the AMQP connections whose client side uses one of `local_ports`; how many."""
        # Tab-separated, not JSON: only this spelling of a pid is what close_connection takes.
        out = await self.ctl("list_connections", "pid", "peer_port", "--silent",
                             "--no-table-headers")
        closed = 0
        for line in out.splitlines():
            pid, _, port = line.partition("\t")
            if port.strip().isdigit() and int(port) in local_ports:
                await self.ctl("close_connection", pid, reason)
                closed += 1
        return closed


@dataclass(frozen=True)
class TcpConnection:
    local_port: int
    unread: int  # bytes received that the process has not read yet


def tcp_connections_of(pid: int, remote_port: int) -> list[TcpConnection]:
    """The TCP connections process `pid` holds to port `remote_port` (on this machine)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:["):-1])
    found = []
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                fields = line.split()
                local, remote, queues, inode = fields[1], fields[2], fields[4], fields[9]
                if inode in inodes and int(remote.rsplit(":", 1)[1], 16) == remote_port:
                    found.append(TcpConnection(int(local.rsplit(":", 1)[1], 16),
                                               int(queues.split(":")[1], 16)))
    return found


def tcp_ports_of(pid: int, remote_port: int) -> set[int]:
    """Local ports of the TCP connections process `pid` holds to port `remote_port`."""
    return {c.local_port for c in tcp_connections_of(pid, remote_port)}
