"""A recording reverse proxy: what a real client sends, written down before it is forwarded.

Used by hand to refresh `tests/corpus/` when a client (Claude Code, an SDK) changes:

    python tests/clients/record_proxy.py --port 18091 --upstream http://127.0.0.1:18090 \
        --out calls.jsonl [--egress-port 18092]
    ANTHROPIC_BASE_URL=http://127.0.0.1:18091 ANTHROPIC_API_KEY=sk-test claude -p "say hello"

Each request becomes one JSON line: method, path, query, headers (credentials replaced by
`sk-test`), the body (parsed when it is JSON), and the upstream's status, content type and the
start of its answer. `--egress-port` also opens a plain HTTP proxy (point HTTPS_PROXY and
HTTP_PROXY at it) that refuses every request and records which host was asked for, to see
whether a client tries to reach anything besides its base URL.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

CREDENTIAL_HEADERS = ("x-api-key", "authorization", "proxy-authorization", "cookie")
HOP_HEADERS = ("host", "content-length", "transfer-encoding", "connection", "keep-alive")
RESPONSE_SAMPLE = 4000
UPSTREAM = web.AppKey("upstream", str)
OUT = web.AppKey("out", Path)
HTTP = web.AppKey("http", aiohttp.ClientSession)


def sanitised(headers: Any) -> dict[str, str]:
    """Headers as a dict (repeated names joined by ", "), credentials replaced."""
    out: dict[str, str] = {}
    for name, value in headers.items():
        key = name.lower()
        if key in CREDENTIAL_HEADERS:
            value = "Bearer sk-test" if key == "authorization" else "sk-test"
        out[key] = f"{out[key]}, {value}" if key in out else value
    return out


def append(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as out:
        out.write(json.dumps(record) + "\n")


async def forward(request: web.Request) -> web.StreamResponse:
    raw = await request.read()
    try:
        body: Any = json.loads(raw) if raw else None
    except ValueError:
        body = raw.decode(errors="replace")
    record: dict[str, Any] = {
        "time": time.time(), "method": request.method, "path": request.path,
        "query": request.query_string, "headers": sanitised(request.headers), "body": body,
    }
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
    url = request.app[UPSTREAM] + request.path_qs
    sample = bytearray()
    try:
        async with request.app[HTTP].request(request.method, url, headers=headers,
                                             data=raw or None) as upstream:
            response = web.StreamResponse(status=upstream.status)
            for name, value in upstream.headers.items():
                if name.lower() not in HOP_HEADERS and name.lower() != "content-encoding":
                    response.headers.add(name, value)
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                if len(sample) < RESPONSE_SAMPLE:
                    sample.extend(chunk[: RESPONSE_SAMPLE - len(sample)])
                await response.write(chunk)
            await response.write_eof()
            record.update(status=upstream.status,
                          content_type=upstream.headers.get("content-type"))
            return response
    except aiohttp.ClientError as exc:
        record.update(status=502, error=repr(exc))
        return web.Response(status=502, text=repr(exc))
    finally:
        record["response"] = sample.decode(errors="replace")
        append(request.app[OUT], record)


async def egress(out: Path, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Refuse a proxied request (CONNECT or absolute URI) and write down where it was going."""
    with contextlib.suppress(Exception):
        line = (await asyncio.wait_for(reader.readline(), 10)).decode(errors="replace").strip()
        append(out, {"time": time.time(), "egress": line})
        writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
    writer.close()


async def serve(port: int, upstream: str, out: Path, egress_port: int | None) -> None:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[UPSTREAM], app[OUT] = upstream.rstrip("/"), out

    async def session(app: web.Application):  # type: ignore[no-untyped-def]
        async with aiohttp.ClientSession(auto_decompress=False,
                                         timeout=aiohttp.ClientTimeout(total=None)) as http:
            app[HTTP] = http
            yield

    app.cleanup_ctx.append(session)
    app.router.add_route("*", "/{tail:.*}", forward)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    servers = []
    if egress_port is not None:
        servers.append(await asyncio.start_server(
            lambda r, w: egress(out, r, w), "127.0.0.1", egress_port))
    print(f"recording http://127.0.0.1:{port} -> {upstream} into {out}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for server in servers:
            server.close()
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--egress-port", type=int)
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.upstream, args.out, args.egress_port))


if __name__ == "__main__":
    main()
