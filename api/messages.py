"""POST /anthropic/v1/messages: validate, publish, answer. No provider is called here."""

from __future__ import annotations

from aiohttp import web
from pydantic import ValidationError

from api.envelope import build_envelope
from api.interactive import serve_interactive
from api.keys import MODE, MODEL, SETTINGS, STORE, SUBMITS
from api.responses import json_bytes, json_response
from shared.errors import InvalidRequest, NotFound
from shared.jobs import caller_hash, format_job_id, parse_job_id
from shared.settings import Settings
from shared.store import NewJob
from shared.wire import MessagesRequest, describe_validation_error, parse_request

ASYNC = "x-bf-async"
ASYNC_ID = "x-bf-async-id"
ASYNC_TTL = "x-bf-async-job-result-ttl"
ASYNC_STATUS = "x-bf-async-status"

_JSON_TYPES = ("application/json",)


def parse_async_flag(value: str | None) -> bool:
    if value is None:
        return False
    flag = value.strip().lower()
    if flag in ("true", "1"):
        return True
    if flag in ("false", "0", ""):
        return False
    raise InvalidRequest(f"{ASYNC} must be 'true' or 'false', got {value!r}")


def parse_ttl(value: str | None, settings: Settings) -> int:
    if value is None:
        return settings.result_ttl_default_s
    try:
        ttl = int(value.strip())
    except ValueError:
        raise InvalidRequest(
            f"{ASYNC_TTL} must be a whole number of seconds, got {value!r}") from None
    if not 0 <= ttl <= settings.result_ttl_max_s:
        raise InvalidRequest(
            f"{ASYNC_TTL} must be between 0 and {settings.result_ttl_max_s} seconds, got {ttl}"
        )
    return ttl


async def read_request(request: web.Request) -> tuple[bytes, MessagesRequest]:
    content_type = request.headers.get("Content-Type")
    if content_type is not None:
        mime = content_type.split(";", 1)[0].strip().lower()
        if mime not in _JSON_TYPES and not mime.endswith("+json"):
            raise InvalidRequest(f"Content-Type must be application/json, got {content_type!r}")
    body = await request.read()  # aiohttp enforces client_max_size (413)
    if not body:
        raise InvalidRequest("request body is empty; expected a JSON Messages request")
    try:
        return body, parse_request(body)
    except ValidationError as exc:
        raise InvalidRequest(describe_validation_error(exc, body)) from None


def pending_message(job_id: str, model: str) -> dict[str, object]:
    return {
        "id": job_id, "type": "message", "role": "assistant", "model": model, "content": [],
        "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 0, "output_tokens": 0},
    }


async def create_message(request: web.Request) -> web.StreamResponse:
    headers = request.headers
    caller = caller_hash(headers.get("x-api-key"), headers.get("authorization"))
    poll_id = headers.get(ASYNC_ID)
    if poll_id is not None:
        request[MODE] = "poll"
        return await poll_job(request, poll_id, caller)

    request[MODE] = "invalid"  # until the request has been read and validated
    is_async = parse_async_flag(headers.get(ASYNC))
    body, message_request = await read_request(request)
    request[MODEL] = message_request.model
    request[MODE] = "submit" if is_async else "stream" if message_request.stream else "sync"
    if not is_async:
        return await serve_interactive(request, body, message_request, caller)
    if message_request.stream:
        raise InvalidRequest("streaming is not supported for async requests")
    return await submit_job(request, body, message_request, caller)


async def submit_job(request: web.Request, body: bytes, message_request: MessagesRequest,
                     caller: bytes) -> web.Response:
    settings = request.app[SETTINGS]
    ttl = parse_ttl(request.headers.get(ASYNC_TTL), settings)
    envelope = build_envelope(request, body, message_request, "async")
    job_id = envelope.job_id
    job = NewJob(job_id, caller, "async", message_request.model, envelope.provider, ttl,
                 envelope.upstream_model or message_request.model)
    await request.app[SUBMITS].submit(job, envelope)
    return json_response(
        pending_message(format_job_id(job_id), message_request.model),
        headers={ASYNC_STATUS: "pending"},
    )


async def poll_job(request: web.Request, poll_id: str, caller: bytes) -> web.Response:
    job_id = parse_job_id(poll_id)
    view = await request.app[STORE].get_job(job_id, caller) if job_id else None
    if view is None:
        raise NotFound(f"async job {poll_id!r} not found (unknown, expired, or not yours)")
    status_header = {ASYNC_STATUS: view.status}
    if view.status in ("pending", "processing"):
        return json_response(pending_message(poll_id, view.model), headers=status_header)
    assert view.body is not None
    status = (view.http_status or 500) if view.status == "failed" else 200
    return json_bytes(view.body, status=status, headers=status_header)
