"""A request as Ferry reads it (its body, outline, route and forwarded headers), and the job
message built from it for the workers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiohttp import web

from api.body import check_content_type, read_body
from api.headers import fallbacks_header, forwarded_headers
from api.state import CHECKER, MODEL, PROVIDERS, REQUEST_ID_KEY, SETTINGS
from api.validation import RequestFacts
from shared.errors import InvalidRequest
from shared.jobs import JobEnvelope, Mode, Operation, new_job_id
from shared.providers import Resolution

MAX_QUERY = 1024


@dataclass(frozen=True, slots=True)
class Inbound:
    body: bytes
    facts: RequestFacts
    resolution: Resolution
    forward_headers: tuple[tuple[str, str], ...]
    query: str


async def read_inbound(request: web.Request, *, count_tokens: bool = False) -> Inbound:
    """Read and check a Messages (or count_tokens) request; raises a 4xx FerryError."""
    settings = request.app[SETTINGS]
    check_content_type(request)
    forward = forwarded_headers(request.headers)  # header faults before reading the body
    query = request.query_string
    if len(query) > MAX_QUERY or not query.isascii():
        raise InvalidRequest(f"the query string must be ASCII, at most {MAX_QUERY} characters")
    body = await read_body(request, settings.max_body_bytes, settings.body_timeout_s)
    if not body:
        raise InvalidRequest("request body is empty; expected a JSON Messages request")
    facts = await request.app[CHECKER].check(body, count_tokens=count_tokens)
    request[MODEL] = facts.model
    resolution = request.app[PROVIDERS].resolve(facts.model, fallbacks_header(request.headers))
    return Inbound(body, facts, resolution, forward, query)


def build_envelope(request: web.Request, inbound: Inbound, mode: Mode,
                   operation: Operation = "messages", **interactive: Any) -> JobEnvelope:
    route = inbound.resolution.primary
    return JobEnvelope(
        job_id=new_job_id(), mode=mode, operation=operation, model=inbound.facts.model,
        provider=route.provider, upstream_model=route.model,
        fallbacks=tuple(str(r) for r in inbound.resolution.fallbacks),
        forward_headers=inbound.forward_headers, query=inbound.query,
        request_id=request.get(REQUEST_ID_KEY), body=inbound.body, **interactive,
    )
