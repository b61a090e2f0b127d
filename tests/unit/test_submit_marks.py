"""The submit batcher's bookkeeping after the answers: marks gather for a while and behind a
slow one, and shutdown records what gathered at once and waits for it only so long
(stand-ins for the store and broker; the real ones are in tests/integration/test_api.py)."""

from __future__ import annotations

import asyncio
import uuid
from typing import cast

import pytest

import api.submit
from api.submit import SubmitBatcher
from shared.broker import Broker
from shared.store import NewJob, Store


class SlowMarkStore:
    """Stores every job; each mark waits until `release` is set."""

    def __init__(self) -> None:
        self.marks: list[list[uuid.UUID]] = []
        self.release = asyncio.Event()

    async def insert_jobs(self, jobs: list[NewJob]) -> list[None]:
        return [None] * len(jobs)

    async def mark_published(self, ids: list[uuid.UUID]) -> None:
        self.marks.append(ids)
        await self.release.wait()


class InstantBroker:
    async def publish_raw_job(self, job_id: uuid.UUID, body: bytes) -> None:
        await asyncio.sleep(0)


def job() -> NewJob:
    return NewJob(uuid.uuid4(), b"caller", "async", "m", "anthropic", 60, b"{}")


def batcher(store: SlowMarkStore) -> SubmitBatcher:
    return SubmitBatcher(cast(Store, store), cast(Broker, InstantBroker()))


async def test_marks_gather_and_share_one_statement(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api.submit, "MARK_EVERY_S", 0.5)  # wide: a loaded machine stalls
    store = SlowMarkStore()
    store.release.set()
    submits = batcher(store)
    jobs = [job() for _ in range(3)]
    for j in jobs:  # three batches, one after another
        await asyncio.wait_for(submits.submit(j), 1)
    assert store.marks == []
    await asyncio.sleep(1.0)
    assert store.marks == [[j.id for j in jobs]]


async def test_shutdown_records_gathered_marks_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api.submit, "MARK_EVERY_S", 60)
    store = SlowMarkStore()
    store.release.set()
    submits = batcher(store)
    first = job()
    await asyncio.wait_for(submits.submit(first), 1)
    await asyncio.sleep(0)
    assert store.marks == []
    await asyncio.wait_for(submits.drain(), 1)
    assert store.marks == [[first.id]]


async def test_submits_are_answered_while_a_mark_is_slow_and_later_marks_share_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api.submit, "MARK_EVERY_S", 0)
    store = SlowMarkStore()
    submits = batcher(store)
    first = job()
    await asyncio.wait_for(submits.submit(first), 1)
    await asyncio.sleep(0)  # the marker starts, and hangs on the first mark
    later = [job() for _ in range(5)]
    await asyncio.wait_for(asyncio.gather(*(submits.submit(j) for j in later)), 1)
    assert store.marks == [[first.id]]
    store.release.set()
    await submits.drain()
    assert store.marks == [[first.id], [j.id for j in later]]


async def test_shutdown_waits_for_marks_only_so_long(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api.submit, "DRAIN_TIMEOUT_S", 0.05)
    store = SlowMarkStore()
    submits = batcher(store)
    await asyncio.wait_for(submits.submit(job()), 1)
    await asyncio.wait_for(submits.drain(), 1)  # the mark never ends: drain gives up
    assert len(store.marks) == 1
