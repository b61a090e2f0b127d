"""Turning a validated request into the job message the workers consume."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from api.keys import PROVIDERS
from shared.jobs import JobEnvelope, Mode, new_job_id
from shared.wire import MessagesRequest


def build_envelope(request: web.Request, body: bytes, message_request: MessagesRequest,
                   mode: Mode, **interactive: Any) -> JobEnvelope:
    """The job message: the route picked from `model` (and `fallbacks`), the headers the
    provider must see, and the client's body as sent."""
    providers = request.app[PROVIDERS]
    route = providers.route(message_request.model)
    fallbacks = tuple(
        str(providers.route(model, field=f"fallbacks.{i}"))
        for i, model in enumerate(message_request.fallbacks or ())
    )
    return JobEnvelope(
        job_id=new_job_id(), mode=mode, model=message_request.model, provider=route.provider,
        upstream_model=route.model, fallbacks=fallbacks,
        anthropic_version=request.headers.get("anthropic-version"),
        anthropic_beta=request.headers.get("anthropic-beta"), body=body, **interactive,
    )
