"""`ferry dev` as a newcomer meets it (the README's first command): it creates a local key on
its first run and prints a curl line that works as printed; the gateway is closed to callers
without a key; a second run reuses the key."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import orjson
import pytest

from tests.acceptance.stack import PROJECT_ROOT
from tests.conftest import TestRun
from tests.support import free_port

pytestmark = pytest.mark.acceptance

START_TIMEOUT_S = 60.0


def dev_env(run: TestRun, database_url: str, namespace: str, key_file: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FERRY_", "ANTHROPIC_", "OPENAI_"))}
    env.update(DATABASE_URL=database_url, AMQP_URL=run.amqp_url, FERRY_NAMESPACE=namespace,
               FERRY_DEV_KEY_FILE=str(key_file), FERRY_LOG_FORMAT="json", PYTHONUNBUFFERED="1")
    return env


async def start_dev(env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    args = ["dev", "--workers", "1", "--port", str(port), "--fake-provider-port",
            str(free_port()), "--metrics-port", str(free_port())]
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "shared.cli", *args], cwd=PROJECT_ROOT,
                                env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


async def printed_curl(log: Path, proc: subprocess.Popen[bytes]) -> str:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        match = re.search(r"^  (curl .*)$", log.read_text(errors="replace"), re.MULTILINE)
        if match:
            return match.group(1)
        assert proc.poll() is None, log.read_text()
        await asyncio.sleep(0.2)
    raise AssertionError(f"no curl line printed:\n{log.read_text()}")


async def run_curl(line: str, port: int) -> dict[str, object]:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:  # the api may still be starting
        done = await asyncio.to_thread(subprocess.run, ["bash", "-c", line + " -w '\\n%{http_code}'"],
                                       cwd=PROJECT_ROOT, capture_output=True, text=True,
                                       timeout=60, check=False)
        body, _, status = done.stdout.rpartition("\n")
        if status == "200":
            data: dict[str, object] = orjson.loads(body)
            return data
        assert time.monotonic() < deadline, f"curl answered {status}: {done.stdout}"
        await asyncio.sleep(0.5)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


async def test_ferry_dev_gives_a_newcomer_a_working_key(test_run: TestRun,
                                                        tmp_path: Path) -> None:
    database_url = test_run.database_url(test_run.new_database_name())
    namespace = test_run.new_namespace("dev")
    key_file = tmp_path / "dev-key"
    env = dev_env(test_run, database_url, namespace, key_file)
    port = free_port()
    log = tmp_path / "dev.log"
    proc = await start_dev(env, port, log)
    try:
        line = await printed_curl(log, proc)
        secret = key_file.read_text().strip()
        assert secret.startswith("sk-ferry-") and secret in log.read_text()
        assert oct(key_file.stat().st_mode & 0o777) == "0o600"
        answer = await run_curl(line, port)  # as printed, in a shell
        assert answer["type"] == "message" and answer["content"]
        async with aiohttp.ClientSession() as http, http.post(
                f"http://127.0.0.1:{port}/anthropic/v1/messages",
                json={"model": "m", "max_tokens": 8,
                      "messages": [{"role": "user", "content": "no key"}]}) as resp:
            assert resp.status == 401  # closed to callers without a key
    finally:
        stop(proc)
    proc = await start_dev(env, port, log)  # a second run keeps the key
    try:
        await printed_curl(log, proc)
        assert key_file.read_text().strip() == secret
        assert (await run_curl(line, port))["type"] == "message"
    finally:
        stop(proc)
        await test_run.drop_database(database_url)
        await test_run.delete_namespaces([namespace])
