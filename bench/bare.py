"""The ceiling: a bare aiohttp handler that reads the body and answers a small JSON, served the
way Ferry's api is served (one process, same runner options). `python -m bench.bare --port P`.
"""

from __future__ import annotations

import argparse

from aiohttp import web

ANSWER = b'{"id":"job_bare","type":"message","content":[]}'


async def handle(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=ANSWER, content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    return web.Response(body=b'{"status":"ok"}', content_type="application/json")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bare", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_post("/{tail:.*}", handle)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None,
                handle_signals=True, handler_cancellation=True)


if __name__ == "__main__":
    main()
