"""Anthropic's Message Batches API on Ferry's queue: /anthropic/v1/messages/batches.

Create reads the body as it arrives (api/batch_stream.py) and writes each request as a job in
one transaction (shared/batchstore.py); once committed, the answer goes out and the requests
are published to the batch lane in the background (the reconciler publishes what a stopped api
left unpublished). Each request then runs as any Ferry job: same workers, retries, fallbacks
and providers (`openai/...` included), on a lane of its own so that a big batch never takes
the slots of single jobs or interactive requests.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime

import orjson
from aiohttp import web

from api.auth import Principal, check_model
from api.batch_stream import BatchParser, BatchRequest
from api.body import check_content_type, stream_body
from api.headers import forwarded_headers
from api.messages import authenticate
from api.responses import json_response
from api.state import BATCHES, LIMITER, MODE, PROVIDERS, REQUEST_ID_KEY, SETTINGS
from shared.batchstore import BatchJob, BatchView, format_batch_id, parse_batch_id
from shared.errors import AuthenticationFailed, FerryError, InvalidRequest, NotFound
from shared.jobs import JobEnvelope
from shared.logging import get_logger
from shared.settings import Settings
from shared.wire import ErrorEnvelope

log = get_logger("ferry.batches")

PATH = "/anthropic/v1/messages/batches"
RESULTS_PAGE = 1000


# --- handlers --------------------------------------------------------------------------------

async def _owner(request: web.Request) -> Principal:
    principal = await authenticate(request)
    if principal.anonymous:
        raise AuthenticationFailed("batches are bound to the credential that creates them: "
                                   "send x-api-key or Authorization")
    return principal


async def create_batch(request: web.Request) -> web.Response:
    request[MODE] = "batch_create"
    principal = await _owner(request)
    settings = request.app[SETTINGS]
    check_content_type(request)
    forward = forwarded_headers(request.headers)
    await request.app[LIMITER].admit(principal)
    batches = request.app[BATCHES]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.batch_create_timeout_s
    request_id = request.get(REQUEST_ID_KEY)
    async with batches.creates:
        parser = BatchParser(max_request_bytes=settings.max_body_bytes)
        async with batches.store.creating(
                principal.owner, principal.key_id, request_id, settings.batch_retention_s,
                settings.batch_expiry_s, settings.db_connect_timeout_s) as writer:
            async for piece in stream_body(request, settings.max_batch_body_bytes, deadline):
                for item in parser.feed(piece):
                    await writer.add(_job(request, principal, item, forward, request_id))
            for item in parser.finish():
                await writer.add(_job(request, principal, item, forward, request_id))
        view = await batches.store.get(writer.batch_id, principal.owner)
    assert view is not None
    log.info("batch created", batch_id=format_batch_id(writer.batch_id), requests=writer.count,
             errored_at_once=writer.count - writer.runnable)
    if writer.runnable:
        batches.publish_later(writer.batch_id, writer.runnable)
    return json_response(_batch_json(request, view))


def _job(request: web.Request, principal: Principal, item: BatchRequest,
         forward: tuple[tuple[str, str], ...], request_id: str | None) -> BatchJob:
    """A request as a job; one Ferry cannot run (bad params, unknown provider, a model the key
    may not use) is errored at once, with the error a Messages request would have got."""
    job_id = uuid.uuid4()
    error: FerryError
    if item.facts is None:
        error = InvalidRequest(item.error or "invalid request")
    else:
        model = item.facts.model
        try:
            check_model(principal, model)
            resolution = request.app[PROVIDERS].resolve(model)
        except FerryError as exc:
            error = exc
        else:
            route = resolution.primary
            envelope = JobEnvelope(
                job_id=job_id, model=model, body=item.params, mode="batch",
                provider=route.provider, upstream_model=route.model,
                fallbacks=tuple(str(r) for r in resolution.fallbacks),
                forward_headers=forward, request_id=request_id, key_id=principal.key_id)
            return BatchJob(job_id, item.index, item.custom_id, model, route.provider,
                            route.model, envelope.encode())
    body = ErrorEnvelope.of(error.error_type, error.message, request_id).to_json()
    model = item.facts.model if item.facts is not None else ""
    return BatchJob(job_id, item.index, item.custom_id, model, "", None, None, body,
                    error.status, error.error_type)


async def get_batch(request: web.Request) -> web.Response:
    request[MODE] = "batch"
    principal = await _owner(request)
    view = await request.app[BATCHES].store.get(_batch_id(request), principal.owner)
    if view is None:
        raise _not_found(request)
    return json_response(_batch_json(request, view))


async def list_batches(request: web.Request) -> web.Response:
    request[MODE] = "batch"
    principal = await _owner(request)
    query = request.query
    limit = _limit(query.get("limit"))
    after, before = query.get("after_id"), query.get("before_id")
    if after is not None and before is not None:
        raise InvalidRequest("after_id and before_id cannot both be given")
    store = request.app[BATCHES].store
    cursors = {}
    for name, value in (("after_id", after), ("before_id", before)):
        if value is not None:
            cursor = parse_batch_id(value)
            if cursor is None or not await store.exists(cursor, principal.owner):
                raise InvalidRequest(f"{name}: no batch {value[:100]!r}")
            cursors[name] = cursor
    views, more = await store.page(principal.owner, limit, cursors.get("after_id"),
                                   cursors.get("before_id"))
    data = [_batch_json(request, v) for v in views]
    return json_response({"data": data, "has_more": more,
                          "first_id": data[0]["id"] if data else None,
                          "last_id": data[-1]["id"] if data else None})


async def cancel_batch(request: web.Request) -> web.Response:
    request[MODE] = "batch"
    principal = await _owner(request)
    view = await request.app[BATCHES].store.cancel(_batch_id(request), principal.owner)
    if view is None:
        raise _not_found(request)
    return json_response(_batch_json(request, view))


async def delete_batch(request: web.Request) -> web.Response:
    request[MODE] = "batch"
    principal = await _owner(request)
    batch_id = _batch_id(request)
    store = request.app[BATCHES].store
    view = await store.get(batch_id, principal.owner)  # writes the end of a batch just ended
    if view is None:
        raise _not_found(request)
    if view.processing_status != "ended":
        raise InvalidRequest(f"batch {format_batch_id(batch_id)} is {view.processing_status}: "
                             "only an ended batch can be deleted (cancel it first)")
    if not await store.delete(batch_id, principal.owner):
        raise _not_found(request)
    return json_response({"id": format_batch_id(batch_id), "type": "message_batch_deleted"})


async def batch_results(request: web.Request) -> web.StreamResponse:
    """JSONL, one line per request in the order they were given, read from PostgreSQL a page
    at a time (nothing held for the whole batch)."""
    request[MODE] = "batch"
    principal = await _owner(request)
    batch_id = _batch_id(request)
    store = request.app[BATCHES].store
    view = await store.get(batch_id, principal.owner)
    if view is None:
        raise _not_found(request)
    if view.processing_status != "ended":
        raise InvalidRequest(f"batch {format_batch_id(batch_id)} is {view.processing_status}: "
                             "its results are available once it has ended")
    response = web.StreamResponse(headers={"content-type": "application/x-jsonl"})
    await response.prepare(request)
    after = -1
    while True:
        rows = await store.results(batch_id, after, RESULTS_PAGE)
        if not rows:
            break
        await response.write(b"".join(_result_line(r.custom_id, r.status, r.body)
                                      for r in rows))
        after = rows[-1].index
    await response.write_eof()
    return response


def _result_line(custom_id: str, status: str, body: str | None) -> bytes:
    head = b'{"custom_id":' + orjson.dumps(custom_id) + b',"result":'
    if status == "completed" and body is not None:
        result = b'{"type":"succeeded","message":' + body.encode() + b"}"
    elif status == "failed" and body is not None:
        result = b'{"type":"errored","error":' + body.encode() + b"}"
    elif status == "canceled":
        result = b'{"type":"canceled"}'
    else:  # expired (or a result past its retention)
        result = b'{"type":"expired"}'
    return head + result + b"}\n"


# --- shapes ----------------------------------------------------------------------------------

def _batch_json(request: web.Request, view: BatchView) -> dict[str, object]:
    batch_id = format_batch_id(view.id)
    ended = view.processing_status == "ended"
    return {
        "id": batch_id, "type": "message_batch", "processing_status": view.processing_status,
        "request_counts": view.counts,
        "ended_at": _time(view.ended_at), "created_at": _time(view.created_at),
        "expires_at": _time(view.expires_at), "archived_at": None,
        "cancel_initiated_at": _time(view.cancel_initiated_at),
        "results_url": f"{public_url(request, request.app[SETTINGS])}{PATH}/{batch_id}/results"
        if ended else None,
    }


def public_url(request: web.Request, settings: Settings) -> str:
    """Where clients reach this Ferry: FERRY_PUBLIC_URL, else the request's own scheme and
    Host (a proxy in front sets X-Forwarded-Proto)."""
    if settings.public_url:
        return settings.public_url.rstrip("/")
    scheme = request.headers.get("X-Forwarded-Proto", request.scheme).split(",")[0].strip()
    return f"{scheme if scheme in ('http', 'https') else 'http'}://{request.host}"


def _time(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat().replace("+00:00", "Z")


def _batch_id(request: web.Request) -> uuid.UUID:
    batch_id = parse_batch_id(request.match_info["batch_id"])
    if batch_id is None:
        raise _not_found(request)
    return batch_id


def _not_found(request: web.Request) -> NotFound:
    return NotFound(f"batch {request.match_info['batch_id'][:100]!r} not found (unknown, "
                    "deleted, or not yours)")


def _limit(value: str | None) -> int:
    if value is None:
        return 20
    try:
        limit = int(value)
    except ValueError:
        limit = 0
    if not 1 <= limit <= 1000:
        raise InvalidRequest(f"limit must be an integer from 1 to 1000, got {value[:50]!r}")
    return limit


def add_routes(app: web.Application) -> None:
    from api.server import expect_handler

    app.router.add_post(PATH, create_batch, expect_handler=expect_handler)
    app.router.add_get(PATH, list_batches)
    app.router.add_get(PATH + "/{batch_id}", get_batch)
    app.router.add_post(PATH + "/{batch_id}/cancel", cancel_batch,
                        expect_handler=expect_handler)
    app.router.add_delete(PATH + "/{batch_id}", delete_batch)
    app.router.add_get(PATH + "/{batch_id}/results", batch_results)

