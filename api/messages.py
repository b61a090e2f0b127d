"""POST /anthropic/v1/messages (sync, stream, async submit and poll) and count_tokens:
authenticate, check what routing needs, publish, answer. No provider is called here."""

from __future__ import annotations

import time
import uuid

from aiohttp import web

from api.auth import Principal, check_model
from api.envelope import Inbound, build_envelope, read_inbound
from api.headers import (
    ASYNC,
    ASYNC_ID,
    ASYNC_STATUS,
    ASYNC_TTL,
    FALLBACKS,
    WAIT,
    idempotency_key,
    parse_async_flag,
    parse_ttl,
    parse_wait,
)
from api.interactive import KEEPALIVE_S, serve_interactive
from api.responses import json_bytes, json_response
from api.state import (
    ADMISSION,
    GATE,
    LIMITER,
    MODE,
    PRINCIPAL,
    REPLIES,
    SETTINGS,
    STORE,
    SUBMITS,
    WAITERS,
    WEBHOOKS,
)
from api.webhooks import WEBHOOK, webhook_name
from shared.errors import AuthenticationFailed, InvalidRequest, NotFound
from shared.jobs import JobEnvelope, Operation, format_job_id, parse_job_id
from shared.store import NewJob, body_hash


def pending_message(job_id: str, model: str) -> dict[str, object]:
    return {
        "id": job_id, "type": "message", "role": "assistant", "model": model, "content": [],
        "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 0, "output_tokens": 0},
    }


async def authenticate(request: web.Request) -> Principal:
    principal = await request.app[GATE].authenticate(request.headers)
    request[PRINCIPAL] = principal
    return principal


def check_models(request: web.Request, principal: Principal, inbound: Inbound) -> None:
    """The key may use the model asked for, and any route a fallbacks header names."""
    check_model(principal, inbound.facts.model)
    for route in (request.headers.get(FALLBACKS) or "").split(","):
        if route.strip():
            check_model(principal, route.strip())


async def create_message(request: web.Request) -> web.StreamResponse:
    headers = request.headers
    poll_id = headers.get(ASYNC_ID)
    if poll_id is not None:
        request[MODE] = "poll"
        return await poll_job(request, await authenticate(request), poll_id)
    admission = request.app[ADMISSION]
    if headers.get(ASYNC) is None:
        # Sync or stream: refused under overload before anything else is spent on it.
        request[MODE] = "interactive"
        admission.admit()
    request[MODE] = "invalid"  # until the request has been read and checked
    principal = await authenticate(request)
    is_async = parse_async_flag(headers.get(ASYNC))
    if not is_async and headers.get(ASYNC) is not None:
        admission.admit()
    webhook = webhook_name(headers.get(WEBHOOK))
    if webhook is not None and not is_async:
        raise InvalidRequest(f"{WEBHOOK} is for async jobs: send it with {ASYNC}: true")
    if is_async:
        ttl = parse_ttl(headers.get(ASYNC_TTL), request.app[SETTINGS])
        key = idempotency_key(headers)
        if principal.anonymous:
            # A job is readable by whoever presents the credential that submitted it: with
            # none, anyone without one could read it. Refuse rather than share.
            raise AuthenticationFailed("async jobs are bound to the credential that submits "
                                       "them: send x-api-key or Authorization")
    inbound = await read_inbound(request)
    check_models(request, principal, inbound)
    if is_async and inbound.facts.stream:
        raise InvalidRequest("streaming is not supported for async requests")
    endpoint = (await request.app[WEBHOOKS].resolve(webhook, principal)
                if webhook is not None else None)
    limiter = request.app[LIMITER]
    await limiter.admit(principal)
    if not is_async:
        request[MODE] = "stream" if inbound.facts.stream else "sync"
        async with limiter.in_flight(principal):
            return await serve_interactive(
                request, _interactive(request, principal, inbound, "messages"))
    request[MODE] = "submit"
    return await submit_job(request, principal, inbound, ttl, key, endpoint)


async def count_tokens(request: web.Request) -> web.StreamResponse:
    request[MODE] = "count_tokens"
    request.app[ADMISSION].admit()
    request[MODE] = "invalid"
    principal = await authenticate(request)
    inbound = await read_inbound(request, count_tokens=True)
    check_models(request, principal, inbound)
    request[MODE] = "count_tokens"
    return await serve_interactive(
        request, _interactive(request, principal, inbound, "count_tokens"))


def _interactive(request: web.Request, principal: Principal, inbound: Inbound,
                 operation: Operation) -> JobEnvelope:
    settings = request.app[SETTINGS]
    return build_envelope(
        request, inbound, "stream" if inbound.facts.stream else "sync", operation,
        reply_to=request.app[REPLIES].reply_to, caller_hash=principal.owner,
        pickup_deadline=time.time() + settings.pickup_timeout_s, key_id=principal.key_id,
        keepalive_s=None if inbound.facts.stream else KEEPALIVE_S,
    )


async def submit_job(request: web.Request, principal: Principal, inbound: Inbound, ttl: int,
                     key: str | None, webhook_endpoint_id: uuid.UUID | None = None
                     ) -> web.Response:
    envelope = build_envelope(request, inbound, "async", key_id=principal.key_id)
    route = inbound.resolution.primary
    job = NewJob(envelope.job_id, principal.owner, "async", inbound.facts.model,
                 route.provider, ttl, envelope.encode(), route.model, envelope.request_id,
                 key_id=principal.key_id,
                 max_pending=principal.key.limits.max_pending if principal.key else None,
                 webhook_endpoint_id=webhook_endpoint_id)
    status = "pending"
    job_id = job.id
    submits = request.app[SUBMITS]
    if key is None:
        await submits.submit(job)
    else:
        fingerprint = body_hash(inbound.body, str(ttl).encode(),
                                (request.headers.get(FALLBACKS) or "").encode(),
                                webhook_endpoint_id.bytes if webhook_endpoint_id else b"")
        job_id, status = await submits.submit_idempotent(job, key, fingerprint)
    return json_response(pending_message(format_job_id(job_id), inbound.facts.model),
                         headers={ASYNC_STATUS: status})


async def poll_job(request: web.Request, principal: Principal, poll_id: str) -> web.Response:
    wait_s = parse_wait(request.headers.get(WAIT))
    job_id = parse_job_id(poll_id)
    view = await request.app[STORE].get_job(job_id, principal.owner) if job_id else None
    if job_id and view is not None and wait_s > 0 and view.status in ("pending", "processing"):
        view = await request.app[WAITERS].wait(job_id, principal.owner, wait_s)
    if view is None:
        raise NotFound(f"async job {poll_id[:100]!r} not found (unknown, expired, or not yours)")
    status_header = {ASYNC_STATUS: view.status}
    if view.status in ("pending", "processing"):
        return json_response(pending_message(poll_id.strip(), view.model),
                             headers=status_header)
    assert view.body is not None
    status = (view.http_status or 500) if view.status == "failed" else 200
    return json_bytes(view.body, status=status, headers=status_header)
