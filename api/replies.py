"""Routes worker replies to the request waiting for them, by correlation id."""

from __future__ import annotations

import asyncio
import uuid

from shared.broker import Broker, Delivery, decode_reply
from shared.jobs import Reply
from shared.logging import get_logger

log = get_logger("ferry.api")

# Put into every open inbox when the connection to the broker goes: the request waiting on it
# is answered at once (its reply queue went with the connection), never left to hang.
BROKEN = Reply(kind="error", status=503, body=b"")


class ReplyRouter:
    def __init__(self) -> None:
        self._inboxes: dict[str, asyncio.Queue[Reply]] = {}
        self.reply_to = ""

    async def start(self, broker: Broker) -> None:
        broker.on_lost(lambda _exc: self.fail_all())
        self.reply_to = await broker.consume_replies(self._on_reply)

    def open(self, job_id: uuid.UUID) -> asyncio.Queue[Reply]:
        inbox: asyncio.Queue[Reply] = asyncio.Queue()
        self._inboxes[job_id.hex] = inbox
        return inbox

    def close(self, job_id: uuid.UUID) -> None:
        self._inboxes.pop(job_id.hex, None)

    @property
    def waiting(self) -> int:
        return len(self._inboxes)

    def fail_all(self) -> None:
        if self._inboxes:
            log.warning("broker connection lost; failing waiting requests",
                        waiting=len(self._inboxes))
        for inbox in self._inboxes.values():
            inbox.put_nowait(BROKEN)

    async def _on_reply(self, message: Delivery) -> None:
        try:
            correlation_id, reply = decode_reply(message)
        except ValueError as exc:
            log.warning("undecodable reply dropped", error=str(exc))
            return
        inbox = self._inboxes.get(correlation_id)
        if inbox is not None:
            inbox.put_nowait(reply)
