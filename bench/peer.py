"""The peer: LiteLLM's proxy in front of the same fake provider, in its own venv
(`bench/.peer-venv`, created on first use), serving Anthropic's format on `POST /v1/messages`.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from bench.procs import PROJECT_ROOT, BenchError, Processes, free_port, progress, wait_http
from bench.stack import MODEL

PEER_VENV = PROJECT_ROOT / "bench" / ".peer-venv"
LITELLM = PEER_VENV / "bin" / "litellm"
PEER_PYTHON = PEER_VENV / "bin" / "python"


@dataclass
class LiteLLM:
    procs: Processes
    fake_url: str
    workers: int = 2
    port: int = 0
    version: str = "?"
    # LiteLLM refuses to start without a master key (else every request is unauthenticated);
    # clients present it as `x-api-key`, as they present theirs to Ferry.
    master_key: str = field(default_factory=lambda: "sk-bench-" + secrets.token_hex(16))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def ensure_installed(self) -> None:
        if not LITELLM.exists():
            progress(f"creating {PEER_VENV} and installing 'litellm[proxy]' (a few minutes)")
            log = self.procs.log_dir / "peer-install.log"
            await _run([sys.executable, "-m", "venv", str(PEER_VENV)], log)
            await _run([str(PEER_VENV / "bin" / "pip"), "install", "litellm[proxy]"], log)
        out = await asyncio.to_thread(subprocess.run, [
            str(PEER_PYTHON), "-c",
            "import importlib.metadata as m; print(m.version('litellm'))"],
            capture_output=True, text=True)
        self.version = out.stdout.strip() or "?"

    def write_config(self) -> Path:
        path = self.procs.log_dir / "litellm-config.yaml"
        # The same model name the bench sends to Ferry; LiteLLM calls the fake provider's
        # Anthropic API with a dummy key. No database: the master key is the only credential.
        path.write_text(
            "model_list:\n"
            f"  - model_name: {MODEL}\n"
            "    litellm_params:\n"
            f"      model: anthropic/{MODEL}\n"
            f"      api_base: {self.fake_url}\n"
            "      api_key: sk-bench-upstream\n"
            "litellm_settings:\n"
            "  telemetry: false\n"
            "  drop_params: true\n"
            "  num_retries: 0\n"
            "  request_timeout: 60\n"
        )
        return path

    async def start(self) -> None:
        await self.ensure_installed()
        config = self.write_config()
        self.port = free_port()
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("FERRY_", "ANTHROPIC_", "OPENAI_", "LITELLM_"))
               and k not in ("DATABASE_URL", "AMQP_URL", "REDIS_URL")}
        env.update(
            # Offline: use the bundled model cost map instead of fetching it from GitHub.
            LITELLM_LOCAL_MODEL_COST_MAP="True",
            LITELLM_LOG="ERROR",
            LITELLM_MASTER_KEY=self.master_key,
            PYTHONUNBUFFERED="1",
            VIRTUAL_ENV=str(PEER_VENV),
            PATH=f"{PEER_VENV / 'bin'}:{env.get('PATH', '')}",
        )
        self.procs.start("litellm", [str(LITELLM), "--config", str(config), "--host",
                                     "127.0.0.1", "--port", str(self.port),
                                     "--num_workers", str(self.workers)], env)
        await wait_http(f"{self.url}/health/liveliness", self.procs, "litellm", timeout_s=180)

    def headers(self) -> dict[str, str]:
        return {"content-type": "application/json", "x-api-key": self.master_key,
                "anthropic-version": "2023-06-01"}

    def stop(self) -> None:
        self.procs.stop("litellm")


async def _run(argv: list[str], log: Path) -> None:
    with log.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(*argv, stdout=out, stderr=subprocess.STDOUT,
                                                    stdin=subprocess.DEVNULL)
        code = await proc.wait()
    if code != 0:
        raise BenchError(f"{' '.join(argv)} failed ({code}); see {log}")
