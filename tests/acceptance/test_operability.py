"""What an operator meets: start-up that fails in one clear line and never hangs, signals that
work at every stage, several workers on one host, readiness that means it, bounded metrics,
logs that follow a request, and a compose file wired as documented."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import pytest_asyncio
import yaml

from tests.acceptance.jobs import MODEL, result, submit, unique, user
from tests.acceptance.stack import PROJECT_ROOT, Stack, running_stack
from tests.conftest import TestRun
from tests.support import eventually, free_port

pytestmark = pytest.mark.acceptance

HANG_GUARD_S = 60.0


def ferry_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FERRY_", "ANTHROPIC_", "OPENAI_", "DATABASE_URL", "AMQP_URL"))}
    env.update(FERRY_LOG_FORMAT="json", PYTHONUNBUFFERED="1", FERRY_METRICS_PORT="0")
    env.update(extra)
    return env


def ferry(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shared.cli", *args], cwd=PROJECT_ROOT,
                          env=env, capture_output=True, text=True, timeout=HANG_GUARD_S,
                          check=False, stdin=subprocess.DEVNULL)


class Silent:
    def __init__(self, port: int, held: list[socket.socket]) -> None:
        self.port = port
        self.held = held  # connections accepted so far


@contextmanager
def silent_port() -> Iterator[Silent]:
    """A port that accepts connections and never says a word."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield Silent(server.getsockname()[1], held)
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        server.close()


# --- start-up ---------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["api", "worker"])
@pytest.mark.parametrize("silent", ["broker", "database"])
def test_a_silent_dependency_fails_the_start_in_one_line(
    test_run: TestRun, template_database: str, command: str, silent: str
) -> None:
    with silent_port() as listener:
        port = listener.port
        env = ferry_env(
            DATABASE_URL=(f"postgresql://postgres@127.0.0.1:{port}/x" if silent == "database"
                          else test_run.database_url(template_database)),
            AMQP_URL=(f"amqp://guest:guest@127.0.0.1:{port}/" if silent == "broker"
                      else test_run.amqp_url),
            FERRY_BROKER_CONNECT_TIMEOUT="2", FERRY_DB_CONNECT_TIMEOUT="2",
            FERRY_NAMESPACE=test_run.new_namespace("silent"), FERRY_PORT=str(free_port()))
        done = ferry(command, env=env)
    assert done.returncode == 1, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("ferry ")]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith(f"ferry {command}: ")


@pytest.mark.parametrize("command", ["api", "worker"])
def test_sigterm_stops_a_process_still_starting(test_run: TestRun, command: str) -> None:
    with silent_port() as listener:
        port = listener.port
        env = ferry_env(AMQP_URL=f"amqp://guest:guest@127.0.0.1:{port}/",
                        DATABASE_URL=f"postgresql://postgres@127.0.0.1:{port}/x",
                        FERRY_PORT=str(free_port()))  # default timeouts: 10 s per try
        proc = subprocess.Popen([sys.executable, "-m", "shared.cli", command],
                                cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + HANG_GUARD_S
        while not listener.held:  # it is waiting on the silent port now
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=HANG_GUARD_S)  # a hang guard: it stops within moments
        finally:
            proc.kill()
    assert proc.returncode is not None


@pytest.mark.parametrize(("env", "message"), [
    ({"FERRY_PORT": "eighty"}, "invalid setting FERRY_PORT"),
    ({"FERRY_JOB_DEADLINE": "1790"}, "FERRY_JOB_DEADLINE (1790 s) must be at least 60 s below"),
    ({"AMQP_URL": "http://127.0.0.1:1/"}, "is not an amqp:// or amqps:// URL"),
])
def test_a_bad_setting_is_one_clear_line(env: dict[str, str], message: str) -> None:
    done = ferry("api", env=ferry_env(**env))
    assert done.returncode == 1
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_unreachable_or_refusing_services_are_one_line(test_run: TestRun,
                                                       template_database: str) -> None:
    closed = free_port()
    cases = [
        ({"DATABASE_URL": f"postgresql://postgres@127.0.0.1:{closed}/x"}, "DATABASE_URL"),
        ({"AMQP_URL": f"amqp://guest:guest@127.0.0.1:{closed}/"}, "message broker"),
        ({"AMQP_URL": test_run.amqp_url.replace("guest:guest", "guest:wrong")},
         "message broker"),
    ]
    for extra, hint in cases:
        env = ferry_env(**{"DATABASE_URL": test_run.database_url(template_database),
                           "AMQP_URL": test_run.amqp_url, "FERRY_PORT": str(free_port()),
                           "FERRY_NAMESPACE": test_run.new_namespace("refuse"), **extra})
        done = ferry("worker", env=env)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        assert hint in done.stderr, done.stderr
        assert "wrong" not in done.stderr  # a password never reaches the terminal


def test_a_taken_port_is_one_line(test_run: TestRun, template_database: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = ferry_env(DATABASE_URL=test_run.database_url(template_database),
                        AMQP_URL=test_run.amqp_url, FERRY_HOST="127.0.0.1",
                        FERRY_PORT=str(taken.getsockname()[1]),
                        FERRY_NAMESPACE=test_run.new_namespace("port"))
        done = ferry("api", env=env)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "is in use: set FERRY_PORT" in done.stderr


def test_every_command_says_what_it_reads() -> None:
    for command, names in (("api", ["DATABASE_URL", "AMQP_URL", "FERRY_AUTH", "FERRY_PORT"]),
                           ("worker", ["ANTHROPIC_API_KEY", "FERRY_WORKER_CONCURRENCY"]),
                           ("sweeper", ["FERRY_RECONCILE_INTERVAL", "FERRY_SWEEP_INTERVAL"]),
                           ("migrate", ["DATABASE_URL"]), ("keys", ["DATABASE_URL"])):
        done = ferry(command, "--help", env=ferry_env())
        assert done.returncode == 0
        for name in names:
            assert name in done.stdout, (command, name)
    version = ferry("--version", env=ferry_env())
    assert re.fullmatch(r"ferry \d+\.\d+\.\d+\n", version.stdout)


def test_an_empty_provider_key_is_no_key() -> None:
    from shared.settings import Settings

    assert Settings(anthropic_api_key="").anthropic_api_key is None
    assert Settings(anthropic_api_key="  ").anthropic_api_key is None


# --- a running deployment ------------------------------------------------------------------------


async def test_readyz_means_the_schema_is_there(test_run: TestRun, tmp_path: Path) -> None:
    empty = await test_run.create_database()  # exists, never migrated
    port = free_port()
    env = ferry_env(DATABASE_URL=empty, AMQP_URL=test_run.amqp_url,
                    FERRY_NAMESPACE=test_run.new_namespace("ready"), FERRY_PORT=str(port),
                    FERRY_HOST="127.0.0.1", FERRY_AUTH="off")
    log = (tmp_path / "api.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "shared.cli", "api"], cwd=PROJECT_ROOT,
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        async with aiohttp.ClientSession() as http:
            async def readyz() -> tuple[int, Any] | None:
                try:
                    async with http.get(f"http://127.0.0.1:{port}/readyz") as resp:
                        return resp.status, await resp.json()
                except aiohttp.ClientError:
                    return None

            status, data = await eventually(readyz, timeout=30, what="the api to answer")
            assert status == 503
            assert "run `ferry migrate`" in str(data["problems"])
            done = ferry("migrate", env=env)
            assert done.returncode == 0, done.stderr
            assert await eventually(lambda: _ready(readyz), timeout=10, what="ready")
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()
        await test_run.drop_database(empty)


async def _ready(probe: Any) -> bool:
    answer = await probe()
    return answer is not None and answer[0] == 200


async def test_two_workers_on_one_host_with_default_settings(test_run: TestRun,
                                                             tmp_path: Path) -> None:
    """Same FERRY_METRICS_PORT for both, as with defaults: the second takes the next port."""
    metrics = free_port()
    async with running_stack(test_run, tmp_path, "twoworkers", workers=0) as stack:
        for name in ("worker-a", "worker-b"):
            stack.start(name, "worker", env=stack.env(FERRY_METRICS_PORT=str(metrics)))
        await stack.wait_consumers(["worker-a", "worker-b"])
        served = [_metrics_port(stack, "worker-a"), _metrics_port(stack, "worker-b")]
        assert len(set(served)) == 2 and metrics in served
        async with aiohttp.ClientSession() as http:
            for port in served:
                async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                    assert resp.status == 200


@pytest_asyncio.fixture(scope="module")
async def logged(test_run: TestRun, tmp_path_factory: pytest.TempPathFactory
                 ) -> AsyncIterator[Stack]:
    async with running_stack(test_run, tmp_path_factory.mktemp("ferry-ops"), "ops",
                             workers=1) as stack:
        yield stack


async def test_metric_labels_stay_bounded_whatever_models_clients_name(logged: Stack) -> None:
    client = logged.client()
    try:
        async def bad(i: int) -> None:
            try:
                await client.messages.create(model=f"m{i}-" + "x" * 200, max_tokens=-1,
                                             messages=user("x"))
            except Exception:  # a 400: the point is the label it leaves
                pass

        await asyncio.gather(*(bad(i) for i in range(1000)))
    finally:
        await client.close()
    port = _metrics_port(logged, "api")
    async with aiohttp.ClientSession() as http, \
            http.get(f"http://127.0.0.1:{port}/metrics") as resp:
        text = await resp.text()
    series = [line for line in text.splitlines() if line.startswith("ferry_requests_total{")]
    assert 1 <= len(series) <= 5, series
    assert all('model="other"' in line or 'model="none"' in line for line in series)
    assert len(text) < 200_000
    async with aiohttp.ClientSession() as http, \
            http.get(f"{logged.url}/metrics") as resp:
        assert resp.status == 404  # not on the client port


def _metrics_port(stack: Stack, name: str) -> int:
    text = stack.logs[name].read_text(errors="replace")
    match = re.search(r'"port": (\d+), "event": "metrics served"', text)
    assert match, text[-2000:]
    return int(match.group(1))


def json_lines(stack: Stack, name: str) -> list[dict[str, Any]]:
    out = []
    for line in stack.logs[name].read_text(errors="replace").splitlines():
        if line.strip():
            data = orjson.loads(line)  # every line is one JSON object
            assert isinstance(data, dict) and "event" in data and "level" in data, line
            out.append(data)
    return out


async def test_logs_are_json_and_follow_a_request_across_processes(logged: Stack) -> None:
    client = logged.client()
    try:
        sync = await client.messages.with_raw_response.create(
            model=MODEL, max_tokens=16, messages=user(unique("traced sync")))
        job = await submit(client, unique("traced job"))
        await result(client, job.id)
    finally:
        await client.close()
    sync_id = sync.headers["x-ferry-request-id"]

    async def logged_everywhere() -> bool:
        worker = [e for e in json_lines(logged, "worker-1") if e.get("request_id") == sync_id]
        return bool(worker)

    await eventually(logged_everywhere, what="the worker's line for the request")
    api = json_lines(logged, "api")
    [access] = [e for e in api if e.get("request_id") == sync_id and e["event"] == "request"]
    assert (access["mode"], access["model"], access["status"]) == ("sync", MODEL, 200)
    assert access["duration_ms"] >= 0 and access["path"] == "/anthropic/v1/messages"
    job_lines = [e for e in json_lines(logged, "worker-1")
                 if e.get("job_id") == job.id and e["event"] == "job finished"]
    assert len(job_lines) == 1 and job_lines[0]["request_id"].startswith("req_")


# --- compose.yaml ------------------------------------------------------------------------------


def test_compose_is_wired_as_documented() -> None:
    compose = yaml.safe_load((PROJECT_ROOT / "compose.yaml").read_text())
    services = compose["services"]

    def env(name: str) -> dict[str, Any]:
        return dict(services[name].get("environment") or {})

    assert "ANTHROPIC_API_KEY" not in env("api")  # the api holds no provider key
    assert "ANTHROPIC_API_KEY" in env("worker")
    assert env("worker")["ANTHROPIC_BASE_URL"].endswith(":-https://api.anthropic.com}")
    assert "fake" in services["fake-provider"]["profiles"]  # only when asked for
    for name in ("api", "worker", "sweeper"):
        assert services[name]["depends_on"]["migrate"]["condition"] == \
            "service_completed_successfully"
        assert services[name]["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
        assert env(name)["DATABASE_URL"].startswith("postgresql://")
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "--wait" in services["migrate"]["command"]
    assert "127.0.0.1" in services["postgres"]["healthcheck"]["test"]  # TCP, not the socket
    cluster = [n for n, s in services.items() if "cluster" in (s.get("profiles") or [])]
    assert sorted(cluster) == ["rabbitmq-1", "rabbitmq-2", "rabbitmq-3"]
    config = compose["configs"]["rabbitmq-cluster"]["content"]
    assert all(f"rabbit@rabbitmq-{i}" in config for i in (1, 2, 3))
    dockerfile = (PROJECT_ROOT / "Dockerfile").read_text()
    assert "\nUSER ferry" in dockerfile
    assert dockerfile.index("COPY pyproject.toml") < dockerfile.index("COPY api api")
