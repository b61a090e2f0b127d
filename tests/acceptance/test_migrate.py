"""`ferry migrate` as a process."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import asyncpg
import pytest

from shared.migrate import migration_files
from tests.acceptance.stack import PROJECT_ROOT
from tests.conftest import TestRun

pytestmark = pytest.mark.acceptance


async def test_two_migrations_at_once_on_a_new_database_both_succeed(test_run: TestRun) -> None:
    url = test_run.database_url(test_run.new_database_name())
    env = {k: v for k, v in os.environ.items() if not k.startswith("FERRY_")}
    env.update(DATABASE_URL=url, FERRY_LOG_FORMAT="json")
    try:
        procs = [
            await asyncio.create_subprocess_exec(
                sys.executable, "-m", "shared.cli", "migrate", cwd=PROJECT_ROOT, env=env,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            for _ in range(2)
        ]
        outputs = await asyncio.wait_for(asyncio.gather(*(p.communicate() for p in procs)),
                                         timeout=60)
        for proc, (output, _) in zip(procs, outputs, strict=True):
            assert proc.returncode == 0, output.decode(errors="replace")

        conn = await asyncpg.connect(url)
        try:
            names = [r["name"] for r in
                     await conn.fetch("SELECT name FROM schema_migrations ORDER BY version")]
            assert await conn.fetchval("SELECT to_regclass('jobs') IS NOT NULL")
        finally:
            await conn.close()
        assert names == [path.name for _, path in migration_files()]
    finally:
        await test_run.drop_database(url)
