"""docs/reporting.md's queries, run against history written by real runs through Ferry, so the
documentation cannot drift from the schema."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import anthropic
import asyncpg
import pytest
import pytest_asyncio

from tests.acceptance.interactive_support import providers_stack
from tests.acceptance.jobs import MODEL, result, submit, unique, user
from tests.acceptance.stack import Stack
from tests.conftest import TestRun
from tests.support import eventually

pytestmark = pytest.mark.acceptance

DOC = Path(__file__).resolve().parents[2] / "docs" / "reporting.md"
_BLOCK = re.compile(r"```sql\n-- report: (\w+)\n(.*?)```", re.S)


def reports() -> dict[str, str]:
    found = {name: sql.strip().rstrip(";") for name, sql in _BLOCK.findall(DOC.read_text())}
    assert found, "no `-- report:` SQL blocks in docs/reporting.md"
    return found


@pytest_asyncio.fixture(scope="module")
async def filled(test_run: TestRun,
                 tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    """A stack whose history holds async, sync and stream requests from two callers, one
    failure, and one answer that came from a fallback."""
    async with providers_stack(
        test_run, tmp_path_factory.mktemp("ferry-reporting"), "reporting",
        lambda stack: f'[providers.backup]\ntype = "anthropic"\nbase_url = "{stack.fake_url}"\n',
        env={"FERRY_PROVIDER_MAX_ATTEMPTS": "1", "FERRY_DB_POOL_SIZE": "4",
             "FERRY_AUTH": "keys"},
    ) as stack:
        for name in ("alice", "bob"):
            await stack.create_key(name, "--secret", f"sk-test-reporting-{name}")
        await _fill(stack)
        yield stack


async def _fill(stack: Stack) -> None:
    """Real runs: every row comes from the api and a worker serving the SDK."""
    alice = stack.client("sk-test-reporting-alice")
    bob = stack.client("sk-test-reporting-bob")
    jobs = [await submit(alice, unique(f"alice {i}")) for i in range(3)]
    jobs.append(await submit(bob, unique("bob")))
    for job in jobs:
        await result(alice if job is not jobs[-1] else bob, job.id)
    failed = await submit(alice, unique("[[fake:status=400]] nope"))
    with pytest.raises(anthropic.BadRequestError):
        await result(alice, failed.id)
    await alice.messages.create(model=MODEL, max_tokens=64, messages=user(unique("sync")))
    async with alice.messages.stream(model=MODEL, max_tokens=64,
                                     messages=user(unique("stream"))) as s:
        await s.get_final_message()
    await alice.messages.create(
        model=MODEL, max_tokens=64, extra_headers={"x-ferry-fallbacks": "backup/claude-b"},
        messages=user(unique("[[fake:status=503,fail_model=claude-ferry-test]] fb")))
    # Sync and stream rows are written in batches off the request path.
    await eventually(lambda: _finished_is(stack.database_url, 8),
                     what="8 finished rows in jobs")
    await alice.close()
    await bob.close()


async def _finished_is(database_url: str, expected: int) -> bool:
    conn = await asyncpg.connect(database_url)
    try:
        return expected == await conn.fetchval(
            "SELECT count(*) FROM jobs WHERE status IN ('completed', 'failed')")
    finally:
        await conn.close()


async def run_report(database_url: str, name: str) -> list[asyncpg.Record]:
    sql = reports()[name].replace(":since", "$1")
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetch(sql, await conn.fetchval("SELECT now() - interval '1 day'"))
    finally:
        await conn.close()


def test_every_documented_report_is_tested() -> None:
    assert set(reports()) == {"jobs_per_model_per_day", "failures_by_provider",
                              "latency_percentiles", "busiest_callers", "fallbacks",
                              "usage_per_key_per_day",
                              # run by test_webhooks.py, against real deliveries
                              "webhooks_per_endpoint_per_day"}


async def test_jobs_per_model_per_day(filled: Stack) -> None:
    rows = await run_report(filled.database_url, "jobs_per_model_per_day")
    assert [(r["model"], r["jobs"], r["failed"]) for r in rows] == [(MODEL, 8, 1)]
    assert rows[0]["input_tokens"] > 0 and rows[0]["output_tokens"] > 0


async def test_failures_by_provider(filled: Stack) -> None:
    rows = await run_report(filled.database_url, "failures_by_provider")
    by = {(r["provider"], r["error_type"]): r for r in rows}
    assert by[("anthropic", "invalid_request_error")]["jobs"] == 1
    assert by[("anthropic", "none")]["jobs"] == 6
    assert by[("backup", "none")]["jobs"] == 1
    assert sum(r["share_of_provider"] for r in rows if r["provider"] == "anthropic") == 1


async def test_latency_percentiles(filled: Stack) -> None:
    rows = await run_report(filled.database_url, "latency_percentiles")
    assert {r["mode"]: r["jobs"] for r in rows} == {"async": 5, "sync": 2, "stream": 1}
    for row in rows:
        assert 0 <= row["queue_wait_p50_s"] <= row["queue_wait_p95_s"]
        assert 0 <= row["processing_p50_s"] <= row["processing_p95_s"]


async def test_busiest_callers(filled: Stack) -> None:
    rows = await run_report(filled.database_url, "busiest_callers")
    assert [(r["caller"], r["jobs"], r["failed"]) for r in rows] == [
        ("alice", 7, 1), ("bob", 1, 0)]


async def test_usage_per_key_per_day(filled: Stack) -> None:
    rows = await run_report(filled.database_url, "usage_per_key_per_day")
    assert [(r["key"], r["requests"], r["failed"]) for r in rows] == [
        ("alice", 7, 1), ("bob", 1, 0)]
    assert all(r["input_tokens"] > 0 and r["output_tokens"] > 0 for r in rows)


async def test_fallbacks(filled: Stack) -> None:
    rows = await run_report(filled.database_url, "fallbacks")
    assert [(r["asked"], r["answered"], r["jobs"]) for r in rows] == [
        (f"anthropic/{MODEL}", "backup/claude-b", 1)]


async def test_reports_use_the_time_window(filled: Stack) -> None:
    conn = await asyncpg.connect(filled.database_url)
    try:
        sql = reports()["jobs_per_model_per_day"].replace(":since", "$1")
        assert await conn.fetch(sql, await conn.fetchval("SELECT now() + interval '1 hour'")) == []
    finally:
        await conn.close()
