"""Admission control for sync and stream requests.

A request published to the interactive lane waits there until a worker has a free slot.
When workers fall behind, that wait grows for everyone, and requests that will end in a 529
after the pickup timeout hold connections and memory the whole time. So the front door
watches the oldest request it published that no worker has started: once that one has
waited longer than FERRY_ADMISSION_WAIT, new requests are refused at once with 529 (and a
`retry-after`), until the backlog drains. A burst into idle workers is never refused: they
start it within moments, so nothing waits long.
"""

from __future__ import annotations

import time
import uuid

from shared.errors import Overloaded


class Admission:
    def __init__(self, max_wait_s: float) -> None:
        self._max_wait_s = max_wait_s
        self._waiting: dict[uuid.UUID, float] = {}  # insertion order: oldest first
        self.refused = 0

    def admit(self) -> None:
        """Raises Overloaded while the oldest waiting request has waited too long."""
        if not self._waiting:
            return
        oldest = next(iter(self._waiting.values()))
        if time.monotonic() - oldest > self._max_wait_s:
            self.refused += 1
            raise Overloaded("the workers are saturated; retry later",
                             headers={"retry-after": "1"})

    def published(self, job_id: uuid.UUID) -> None:
        self._waiting[job_id] = time.monotonic()

    def settled(self, job_id: uuid.UUID) -> None:
        """Started by a worker, answered, or given up: no longer waiting for a worker."""
        self._waiting.pop(job_id, None)

    @property
    def waiting(self) -> int:
        return len(self._waiting)
