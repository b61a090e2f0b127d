"""Apply the numbered plain-SQL files in migrations/ in order, once each.

Safe to run twice or from several processes at once: an advisory lock serialises runners and
each file is recorded in schema_migrations in the same transaction that applies it.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from shared.logging import get_logger
from shared.store import Store

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
_LOCK_KEY = 0x6665727279  # "ferry"
_NAME = re.compile(r"^(\d{4})_[\w-]+\.sql$")

log = get_logger("ferry.migrate")


def migration_files(directory: Path = MIGRATIONS_DIR) -> list[tuple[int, Path]]:
    files = []
    for path in sorted(directory.iterdir()):
        match = _NAME.match(path.name)
        if match:
            files.append((int(match.group(1)), path))
    versions = [v for v, _ in files]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"two migrations share a number in {directory}")
    return files


async def ensure_database(dsn: str) -> None:
    """Create the database named in `dsn` if it does not exist yet."""
    parts = urlsplit(dsn)
    name = parts.path.lstrip("/")
    try:
        conn = await asyncpg.connect(dsn)
    except asyncpg.InvalidCatalogNameError:
        admin = urlunsplit(parts._replace(path="/postgres"))
        conn = await asyncpg.connect(admin)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
            log.info("database created", database=name)
        except (asyncpg.DuplicateDatabaseError, asyncpg.UniqueViolationError):
            # Another migrator got there first. When both CREATEs run at the same moment,
            # PostgreSQL reports the loser as a unique violation on pg_database, not 42P04.
            pass
        finally:
            await conn.close()
        return
    await conn.close()


async def migrate_when_reachable(dsn: str, wait_s: float) -> list[str]:
    """`migrate`, retrying for up to `wait_s` while the server cannot be reached."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return await migrate(dsn)
        except (OSError, asyncio.TimeoutError, asyncpg.CannotConnectNowError) as exc:
            if time.monotonic() >= deadline:
                raise
            log.info("database not reachable yet; retrying", error=type(exc).__name__)
            await asyncio.sleep(1)


async def migrate(dsn: str, directory: Path = MIGRATIONS_DIR) -> list[str]:
    """Apply pending migrations; returns the names applied by this call."""
    await ensure_database(dsn)
    applied: list[str] = []
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for version, path in migration_files(directory):
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(path.read_text())
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    version, path.name,
                )
            applied.append(path.name)
            log.info("migration applied", migration=path.name)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
        await conn.close()
    return applied


class SchemaOutOfDate(RuntimeError):
    """The database lacks migrations this code needs."""


def required_versions(directory: Path = MIGRATIONS_DIR) -> set[int]:
    return {version for version, _ in migration_files(directory)}


async def missing_migrations(store: Store) -> list[int]:
    """The migrations this code needs that the database lacks (they may be merged in any
    order, so every number counts, not only the highest)."""
    return sorted(required_versions() - await store.applied_migrations())


async def require_schema(store: Store) -> None:
    """Refuse to run on a database that `ferry migrate` has not brought up to date."""
    missing = await missing_migrations(store)
    if missing:
        raise SchemaOutOfDate(
            f"the database lacks migrations {', '.join(map(str, missing))} that this Ferry "
            "needs: run `ferry migrate`")
