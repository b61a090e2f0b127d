"""`ferry dev`: everything at once for a local run, supervised by honcho.

Migrates, makes sure a local gateway key exists (created on the first run and kept in
`.ferry-dev-key`, so every run can print a ready curl line), then runs the api, the workers,
the sweeper and, when no ANTHROPIC_API_KEY is set, the fake provider as the upstream (of
`openai/...` models too, unless OPENAI_API_KEY or OPENAI_BASE_URL is set).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shlex
import sys
from pathlib import Path

from shared.keyadmin import NewKey, create_key
from shared.keys import hash_secret
from shared.keystore import KeyStore
from shared.settings import Settings
from shared.store import Store

KEY_FILE = Path(os.environ.get("FERRY_DEV_KEY_FILE", ".ferry-dev-key"))


def ensure_dev_key(settings: Settings, path: Path = KEY_FILE) -> str:
    """The local key's secret: the one kept in `path` while it is still an active key,
    else a new key (and the file rewritten, readable by its owner only)."""
    saved = path.read_text().strip() if path.exists() else ""
    secret = asyncio.run(_active_or_new(settings, saved))
    if secret != saved:
        path.write_text(secret + "\n")
        path.chmod(0o600)
    return secret


async def _active_or_new(settings: Settings, saved: str) -> str:
    store = await Store.connect(settings.database_url, min_size=1, max_size=1,
                                timeout_s=settings.db_connect_timeout_s)
    try:
        keystore = KeyStore(store)
        record = await keystore.by_hash(hash_secret(saved)) if saved else None
        if record is not None and record.revoked_at is None and record.expires_at is None:
            return saved
        _, secret = await create_key(keystore, NewKey(name=f"dev-{secrets.token_hex(3)}"))
        return secret
    finally:
        await store.close()


def curl_line(port: int) -> str:
    body = ('{"model":"claude-sonnet-4-5","max_tokens":256,'
            '"messages":[{"role":"user","content":"Hello"}]}')
    return (f"curl -s http://localhost:{port}/anthropic/v1/messages "
            f"-H 'content-type: application/json' -H \"x-api-key: $(cat {KEY_FILE})\" "
            f"-d '{body}'")


def run_dev(settings: Settings, args: argparse.Namespace) -> int:
    from honcho.manager import Manager

    from shared.migrate import migrate

    asyncio.run(migrate(settings.database_url))
    port = args.port or settings.port
    base_port = settings.metrics_port if args.metrics_port is None else args.metrics_port
    env = dict(os.environ, FERRY_PORT=str(port))
    if settings.auth == "keys":
        secret = ensure_dev_key(settings)
        print(f"ferry dev: your local gateway key (kept in {KEY_FILE}):\n  {secret}\n"
              f"try it:\n  {curl_line(port)}\n", flush=True)
    me = [sys.executable, "-m", "shared.cli"]
    manager = Manager()
    if settings.anthropic_api_key is None:
        fake_port = args.fake_provider_port
        env["ANTHROPIC_BASE_URL"] = f"http://127.0.0.1:{fake_port}"
        env.pop("ANTHROPIC_API_KEY", None)  # empty: the fake provider, not the real API
        print("ferry dev: no ANTHROPIC_API_KEY, so the fake provider answers "
              f"(http://127.0.0.1:{fake_port}; docs/fake-provider.md)", flush=True)
        if settings.openai_api_key is None and "OPENAI_BASE_URL" not in os.environ:
            # It speaks chat completions too: `openai/...` models work out of the box.
            env["OPENAI_BASE_URL"] = f"http://127.0.0.1:{fake_port}/v1"
            env.pop("OPENAI_API_KEY", None)
        manager.add_process("fake-provider",
                            shlex.join([*me, "fake-provider", "--port", str(fake_port)]),
                            env=env)
    manager.add_process("api", shlex.join([*me, "api"]), env=env)
    # Each process serves /metrics on its own port: the sweeper the first, the workers after.
    for i in range(1, args.workers + 1):
        metrics = str(base_port + i if base_port else 0)
        manager.add_process(f"worker.{i}", shlex.join([*me, "worker"]),
                            env={**env, "FERRY_METRICS_PORT": metrics})
    manager.add_process("sweeper", shlex.join([*me, "sweeper"]),
                        env={**env, "FERRY_METRICS_PORT": str(base_port)})
    manager.loop()
    return manager.returncode or 0
