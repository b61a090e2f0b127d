"""Real clients run as processes: the TypeScript SDK (`tests/clients/sdk_scenarios.mjs`) and
Claude Code, both from the npm packages pinned in `tests/clients/package.json`.

`install_clients()` installs them once per machine (`tests/clients/install.sh`, which is a no-op
once `node_modules` holds the pinned versions). Tests skip only when node or npm is not
installed at all; an install that fails is a failure.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socketserver
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

CLIENTS_DIR = Path(__file__).resolve().parents[1] / "clients"
SDK_SCRIPT = CLIENTS_DIR / "sdk_scenarios.mjs"
CLAUDE = CLIENTS_DIR / "node_modules" / ".bin" / "claude"
INSTALL_TIMEOUT_S = 600.0
SDK_TIMEOUT_S = 90.0
# The gateway key the clients present; the stack creates it (`ferry keys create --secret`).
CLIENT_KEY = "sk-test-real-clients-0001"
CLAUDE_TIMEOUT_S = 180.0

# Keep Claude Code on the base URL it is given: without these it reaches for Anthropic's own
# hosts (event logging, the MCP registry, update checks) on every run.
CLAUDE_OFFLINE_ENV = {
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    "DISABLE_TELEMETRY": "1",
    "DISABLE_AUTOUPDATER": "1",
    "DISABLE_ERROR_REPORTING": "1",
    "DISABLE_BUG_COMMAND": "1",
}
# What a test's environment must not lend the clients.
_INHERITED_PREFIXES = ("ANTHROPIC_", "CLAUDE_", "OPENAI_", "FERRY_", "HTTP_PROXY", "HTTPS_PROXY",
                       "ALL_PROXY", "NO_PROXY", "NODE_OPTIONS")


def node_tools() -> tuple[str, str] | None:
    node, npm = shutil.which("node"), shutil.which("npm")
    return (node, npm) if node and npm else None


def require_node() -> None:
    if node_tools() is None:
        pytest.skip("node and npm are not installed: the real-client tests need them "
                    "(Node 20+, npm); tests/clients/install.sh installs the clients")


_installed = False


def install_clients() -> None:
    """`tests/clients/install.sh`, once per process and under a file lock across processes."""
    global _installed
    require_node()
    if _installed:
        return
    with (CLIENTS_DIR / ".install.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            proc = subprocess.run(["bash", str(CLIENTS_DIR / "install.sh")], cwd=CLIENTS_DIR,
                                  capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S,
                                  check=False, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            pytest.fail(f"tests/clients/install.sh took more than {INSTALL_TIMEOUT_S}s",
                        pytrace=False)
    if proc.returncode != 0:
        pytest.fail(f"tests/clients/install.sh failed with {proc.returncode}:\n"
                    f"{proc.stdout}\n{proc.stderr}", pytrace=False)
    _installed = True


def _client_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.upper().startswith(_INHERITED_PREFIXES)}
    env.update(extra)
    return env


# --- the TypeScript SDK ---------------------------------------------------------------------


@dataclass
class SdkRun:
    scenario: str
    returncode: int
    output: dict[str, Any]
    stderr: str

    @property
    def failed(self) -> dict[str, Any] | None:
        """The SDK's error when the scenario did not get its answer."""
        return self.output.get("failed")

    def explain(self) -> str:
        return (f"TypeScript SDK scenario {self.scenario!r} exited {self.returncode}: "
                f"{json.dumps(self.output)}" + (f"\nstderr: {self.stderr}" if self.stderr else ""))


def run_sdk(scenario: str, base_url: str, api_key: str = CLIENT_KEY,
            options: dict[str, Any] | None = None) -> SdkRun:
    """Run one scenario of `sdk_scenarios.mjs` against `base_url` (Ferry's `.../anthropic`)."""
    install_clients()
    args = ["node", str(SDK_SCRIPT), scenario]
    if options:
        args.append(json.dumps(options))
    env = _client_env(ANTHROPIC_BASE_URL=base_url, ANTHROPIC_API_KEY=api_key)
    try:
        proc = subprocess.run(args, cwd=CLIENTS_DIR, env=env, capture_output=True, text=True,
                              timeout=SDK_TIMEOUT_S, check=False, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"TypeScript SDK scenario {scenario!r} still running after "
                             f"{SDK_TIMEOUT_S}s; stderr: {exc.stderr!r}") from None
    lines = proc.stdout.strip().splitlines()
    try:
        output = json.loads(lines[-1]) if lines else {}
    except ValueError:
        output = {}
    if not isinstance(output, dict) or "scenario" not in output:
        raise AssertionError(f"TypeScript SDK scenario {scenario!r} exited {proc.returncode} "
                             f"without its JSON line\nstdout: {proc.stdout}\n"
                             f"stderr: {proc.stderr}")
    return SdkRun(scenario, proc.returncode, output, proc.stderr.strip())


# --- Claude Code ----------------------------------------------------------------------------


class _EgressHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        line = self.rfile.readline(4096).decode(errors="replace").strip()
        self.server.seen.append(line)  # type: ignore[attr-defined]
        self.wfile.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n"
                         b"Connection: close\r\n\r\n")


class _EgressTrap(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _EgressHandler)
        self.seen: list[str] = []


@contextmanager
def egress_trap() -> Iterator[_EgressTrap]:
    """A proxy that refuses everything and remembers what was asked for (`CONNECT host:443`):
    given to Claude Code as HTTPS_PROXY, it shows any attempt to leave the base URL."""
    trap = _EgressTrap()
    thread = threading.Thread(target=trap.serve_forever, daemon=True)
    thread.start()
    try:
        yield trap
    finally:
        trap.shutdown()
        trap.server_close()


def claude_env(base_url: str, home: Path, proxy: str, api_key: str = CLIENT_KEY
               ) -> dict[str, str]:
    """Claude Code's environment: a throwaway HOME, `ANTHROPIC_BASE_URL`, no internet."""
    return _client_env(
        HOME=str(home),
        ANTHROPIC_BASE_URL=base_url,
        ANTHROPIC_API_KEY=api_key,
        HTTPS_PROXY=proxy,
        HTTP_PROXY=proxy,
        NO_PROXY="127.0.0.1,localhost",
        **CLAUDE_OFFLINE_ENV,
    )


@dataclass
class ClaudeRun:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    egress: list[str] = field(default_factory=list)
    debug_log: str = ""

    def json_lines(self) -> list[dict[str, Any]]:
        """stdout of `--output-format stream-json`, one object a line."""
        return [json.loads(line) for line in self.stdout.splitlines() if line.strip()]

    def explain(self) -> str:
        tail = self.debug_log[-4000:]
        return (f"claude {' '.join(self.args)} exited {self.returncode}\n"
                f"stdout: {self.stdout[-3000:]}\nstderr: {self.stderr[-3000:]}\n"
                f"egress attempts: {self.egress}\ndebug log tail:\n{tail}")


def run_claude(args: list[str], base_url: str, workdir: Path,
               api_key: str = CLIENT_KEY) -> ClaudeRun:
    """`claude ARGS` in an empty project directory under `workdir`, with its own HOME."""
    install_clients()
    home, project = workdir / "home", workdir / "project"
    home.mkdir(parents=True, exist_ok=True)
    project.mkdir(parents=True, exist_ok=True)
    debug = workdir / "claude-debug.log"
    full = [*args, "--debug-file", str(debug)]
    with egress_trap() as trap:
        env = claude_env(base_url, home, f"http://127.0.0.1:{trap.server_address[1]}", api_key)
        try:
            proc = subprocess.run([str(CLAUDE), *full], cwd=project, env=env,
                                  capture_output=True, text=True, timeout=CLAUDE_TIMEOUT_S,
                                  check=False, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"claude {' '.join(args)} still running after "
                                 f"{CLAUDE_TIMEOUT_S}s; stdout: {exc.stdout!r}") from None
        egress = list(trap.seen)
    log = debug.read_text(errors="replace") if debug.exists() else ""
    return ClaudeRun(args, proc.returncode, proc.stdout, proc.stderr, egress, log)
