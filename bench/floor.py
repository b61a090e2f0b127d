"""The floor of Ferry's design for a sync request: the least a gateway that puts a message
broker between its front door and the process calling the provider can do, with the same
libraries and the same process layout, and nothing else.

- `front`: an aiohttp handler (served as Ferry's api is) reads the body, publishes it to a
  classic queue without a confirm (as Ferry's interactive lane does) with `reply_to` its own
  exclusive queue, and answers with whatever comes back under its correlation id.
- `relay`: consumes that queue (prefetch 64, one task per message), POSTs the body to the
  provider over one pooled aiohttp session, publishes the provider's status and body back,
  and acks.

No authentication, validation, routing, admission, history, metrics or logging: the rows of
this target measure what the broker hop costs on the machine of the run, so that Ferry's
added latency splits into the design's part (floor − direct) and Ferry's own (Ferry − floor).

`python -m bench.floor front --port P --queue Q` and `python -m bench.floor relay --queue Q
--upstream URL`; both take the broker from AMQP_URL.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import uuid

import aio_pika
import aiohttp
from aio_pika.abc import AbstractIncomingMessage
from aiohttp import web

from shared.runtime import Lifecycle, loop_factory, serve

PREFETCH = 64
FORWARDED = ("content-type", "anthropic-version")


def _amqp_url() -> str:
    return os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/").split(",")[0]


async def _declare(channel: aio_pika.abc.AbstractChannel, queue: str) -> None:
    await channel.declare_queue(queue, durable=False, auto_delete=True)


def front(port: int, queue: str) -> None:
    waiting: dict[str, asyncio.Future[tuple[int, bytes]]] = {}
    state: dict[str, object] = {}

    async def on_reply(message: AbstractIncomingMessage) -> None:
        future = waiting.pop(message.correlation_id or "", None)
        if future is not None and not future.done():
            future.set_result((int(str(message.headers.get("status", 200))), message.body))

    async def startup(app: web.Application) -> None:
        connection = await aio_pika.connect(_amqp_url())
        channel = await connection.channel(publisher_confirms=False)
        await _declare(channel, queue)
        replies = await channel.declare_queue(exclusive=True)
        await replies.consume(on_reply, no_ack=True)
        state.update(connection=connection, channel=channel, reply_to=replies.name)

    async def cleanup(app: web.Application) -> None:
        await state["connection"].close()  # type: ignore[attr-defined]

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        correlation_id = uuid.uuid4().hex
        future: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
        waiting[correlation_id] = future
        channel: aio_pika.abc.AbstractChannel = state["channel"]  # type: ignore[assignment]
        try:
            await channel.default_exchange.publish(
                aio_pika.Message(body, correlation_id=correlation_id,
                                 reply_to=str(state["reply_to"]),
                                 headers={h: request.headers.get(h, "") for h in FORWARDED}),
                routing_key=queue)
            status, answer = await asyncio.wait_for(future, 30)
        finally:
            waiting.pop(correlation_id, None)
        return web.Response(body=answer, status=status, content_type="application/json")

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(body=b'{"status":"ok"}', content_type="application/json")

    app = web.Application()
    app.on_startup.append(startup)
    app.on_cleanup.append(cleanup)
    app.router.add_get("/healthz", healthz)
    app.router.add_post("/{tail:.*}", handle)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None,
                handle_signals=True, handler_cancellation=True, loop=loop_factory()())


async def relay_main(life: Lifecycle, queue: str, upstream: str, api_key: str) -> None:
    connection = await aio_pika.connect(_amqp_url())
    channel = await connection.channel(publisher_confirms=False)
    await channel.set_qos(prefetch_count=PREFETCH)
    await _declare(channel, queue)
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=PREFETCH))
    tasks: set[asyncio.Task[None]] = set()

    async def answer(message: AbstractIncomingMessage) -> None:
        headers = {str(k): str(v) for k, v in message.headers.items() if v}
        headers["x-api-key"] = api_key
        try:
            async with session.post(f"{upstream}/v1/messages", data=message.body,
                                    headers=headers) as resp:
                status, body = resp.status, await resp.read()
        except aiohttp.ClientError as exc:
            status, body = 502, repr(exc).encode()
        await channel.default_exchange.publish(
            aio_pika.Message(body, correlation_id=message.correlation_id,
                             headers={"status": status}),
            routing_key=message.reply_to or "")
        await message.ack()

    async def on_message(message: AbstractIncomingMessage) -> None:
        task = asyncio.create_task(answer(message))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    await (await channel.get_queue(queue)).consume(on_message)
    life.started = True
    await life.stop.wait()
    await connection.close()
    await session.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("role", choices=("front", "relay"))
    parser.add_argument("--queue", required=True)
    parser.add_argument("--port", type=int, help="front: the port to serve")
    parser.add_argument("--upstream", help="relay: the provider's base URL")
    parser.add_argument("--api-key", default="sk-bench-upstream",
                        help="relay: the provider key it presents")
    args = parser.parse_args()
    if args.role == "front":
        if args.port is None:
            parser.error("front needs --port")
        front(args.port, args.queue)
    else:
        if args.upstream is None:
            parser.error("relay needs --upstream")
        serve(lambda life: relay_main(life, args.queue, args.upstream, args.api_key))


if __name__ == "__main__":
    main()
