"""Async jobs through the official anthropic SDK, as a client of Ferry would use them."""

from __future__ import annotations

import asyncio
import time
import uuid

import anthropic
import asyncpg
from anthropic.types import Message, MessageParam

MODEL = "claude-ferry-test"  # any name: the fake provider answers them all
SUBMIT = {"x-bf-async": "true"}


def user(text: str) -> list[MessageParam]:
    return [{"role": "user", "content": text}]


def unique(text: str) -> str:
    return f"{text} {uuid.uuid4().hex[:12]}"


def job_uuid(job_id: str) -> uuid.UUID:
    return uuid.UUID(hex=job_id.removeprefix("job_"))


async def submit(client: anthropic.AsyncAnthropic, text: str,
                 headers: dict[str, str] | None = None) -> Message:
    return await client.messages.create(model=MODEL, max_tokens=256, messages=user(text),
                                        extra_headers={**SUBMIT, **(headers or {})})


async def poll(client: anthropic.AsyncAnthropic, job_id: str) -> tuple[str, Message]:
    """(x-bf-async-status, message). The body of a poll is ignored; the SDK needs one."""
    raw = await client.messages.with_raw_response.create(
        model=MODEL, max_tokens=1, messages=user("poll"),
        extra_headers={"x-bf-async-id": job_id},
    )
    return raw.headers["x-bf-async-status"], await raw.parse()


async def result(client: anthropic.AsyncAnthropic, job_id: str,
                 timeout: float = 60.0) -> Message:  # noqa: ASYNC109 -- a polling deadline
    """Poll until the job completed; the SDK raises for a failed one."""
    deadline = time.monotonic() + timeout
    while True:
        status, message = await poll(client, job_id)
        if status == "completed":
            return message
        assert status in ("pending", "processing"), status
        assert message.content == [] and message.id == job_id
        assert time.monotonic() < deadline, f"job {job_id} still {status} after {timeout}s"
        await asyncio.sleep(0.1)


async def job_row(database_url: str, job_id: str) -> asyncpg.Record | None:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetchrow("SELECT * FROM jobs WHERE id = $1", job_uuid(job_id))
    finally:
        await conn.close()


async def result_rows(database_url: str, job_id: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        count: int = await conn.fetchval("SELECT count(*) FROM job_results WHERE job_id = $1",
                                         job_uuid(job_id))
        return count
    finally:
        await conn.close()
