"""The front door in-process (aiohttp TestServer) with the real store and broker: the error
envelope table, request ids, backpressure, and polling."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import orjson
import pytest
import pytest_asyncio
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer

from api.app import create_app
from shared.broker import Broker
from shared.settings import Settings
from tests.support import MODEL, request_body

pytestmark = pytest.mark.integration

PATH = "/anthropic/v1/messages"
KEY_A = {"x-api-key": "key-a"}
KEY_B = {"x-api-key": "key-b"}
ASYNC = {**KEY_A, "x-bf-async": "true", "content-type": "application/json"}
TTL_MAX = 600

MakeClient = Callable[..., Awaitable[TestClient]]


@pytest_asyncio.fixture
async def make_client(settings: Callable[..., Settings]) -> AsyncIterator[MakeClient]:
    """`await make_client(**settings_overrides)`: a client for a freshly started api."""
    clients: list[TestClient] = []

    async def make(**overrides: Any) -> TestClient:
        values = {"result_ttl_max_s": TTL_MAX, **overrides}
        client = TestClient(TestServer(create_app(settings(**values))))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


@pytest_asyncio.fixture
async def client(make_client: MakeClient) -> TestClient:
    return await make_client()


async def error_of(response: ClientResponse) -> tuple[int, str, str]:
    """(status, error type, message), checking the envelope's shape and the request id."""
    data = await response.json()
    assert set(data) == {"type", "error", "request_id"}, data
    assert data["type"] == "error"
    assert set(data["error"]) == {"type", "message"}
    assert data["request_id"] == response.headers["request-id"]
    return response.status, data["error"]["type"], data["error"]["message"]


# --- the error envelope table ----------------------------------------------------------------

BAD_REQUESTS = [
    pytest.param({}, b'{"model": "m", "max_tokens": 1,', 400, "invalid_request_error",
                 "not valid JSON", id="malformed-json"),
    pytest.param({"content-type": "multipart/form-data"}, request_body("hi"), 415,
                 "invalid_request_error", "Content-Type must be application/json",
                 id="wrong-content-type"),
    pytest.param({}, b"", 400, "invalid_request_error", "request body is empty",
                 id="empty-body"),
    pytest.param({}, request_body("hi", max_tokens=-1), 400, "invalid_request_error",
                 "max_tokens: must be greater than or equal to 0", id="outline-max-tokens"),
    pytest.param({}, orjson.dumps({"model": MODEL, "max_tokens": 5,
                                   "messages": [{"role": 7, "content": "x"}]}),
                 400, "invalid_request_error", "messages.0.role: must be a string",
                 id="outline-role"),
    pytest.param({}, orjson.dumps({"model": MODEL, "messages": [{"role": "user",
                                                                  "content": "x"}]}),
                 400, "invalid_request_error", "max_tokens: Field required",
                 id="schema-missing-field"),
    pytest.param({"x-bf-async": "maybe"}, request_body("hi"), 400, "invalid_request_error",
                 "x-bf-async must be 'true' or 'false'", id="bad-async-flag"),
    pytest.param({"x-bf-async-job-result-ttl": "soon"}, request_body("hi"), 400,
                 "invalid_request_error", "whole number of seconds", id="ttl-not-a-number"),
    pytest.param({"x-bf-async-job-result-ttl": "-1"}, request_body("hi"), 400,
                 "invalid_request_error", f"between 0 and {TTL_MAX} seconds, got -1",
                 id="ttl-negative"),
    pytest.param({"x-bf-async-job-result-ttl": str(TTL_MAX + 1)}, request_body("hi"), 400,
                 "invalid_request_error", f"between 0 and {TTL_MAX} seconds",
                 id="ttl-too-large"),
    pytest.param({}, request_body("hi", stream=True), 400, "invalid_request_error",
                 "streaming is not supported for async requests", id="stream-and-async"),
]


@pytest.mark.parametrize(("headers", "body", "status", "error_type", "message"), BAD_REQUESTS)
async def test_bad_requests_get_the_error_envelope(
    client: TestClient, db: asyncpg.Connection, headers: dict[str, str], body: bytes,
    status: int, error_type: str, message: str,
) -> None:
    response = await client.post(PATH, data=body, headers={**ASYNC, **headers})
    got_status, got_type, got_message = await error_of(response)
    assert (got_status, got_type) == (status, error_type)
    assert message in got_message
    assert await db.fetchval("SELECT count(*) FROM jobs") == 0


async def test_a_body_over_the_limit_is_request_too_large(make_client: MakeClient,
                                                          db: asyncpg.Connection) -> None:
    client = await make_client(max_body_bytes=1024)
    response = await client.post(PATH, data=request_body("x" * 2000), headers=ASYNC)
    status, error_type, message = await error_of(response)
    assert (status, error_type) == (413, "request_too_large")
    assert "1024" in message
    assert await db.fetchval("SELECT count(*) FROM jobs") == 0


async def test_an_unknown_path_is_not_found(client: TestClient) -> None:
    response = await client.post("/anthropic/v1/complete", data=request_body("hi"),
                                 headers=ASYNC)
    status, error_type, message = await error_of(response)
    assert (status, error_type) == (404, "not_found_error")
    assert "/anthropic/v1/complete" in message


async def test_get_on_messages_is_method_not_allowed(client: TestClient) -> None:
    response = await client.get(PATH, headers=KEY_A)
    status, error_type, message = await error_of(response)
    assert (status, error_type) == (405, "invalid_request_error")
    assert "POST" in response.headers["Allow"] and "GET" in message


async def test_every_answer_has_a_request_id(client: TestClient) -> None:
    answers = [
        await client.post(PATH, data=request_body("hi"), headers=ASYNC),  # 200
        await client.post(PATH, data=b"{", headers=ASYNC),  # 400
        await client.post(PATH, headers={**KEY_A, "x-bf-async-id": "job_nope"}),  # 404
        await client.get("/healthz"),
        await client.get("/readyz"),
    ]
    assert [a.status for a in answers] == [200, 400, 404, 200, 200]
    ids = [a.headers.get("request-id", "") for a in answers]
    assert all(i.startswith("req_") for i in ids), ids
    assert len(set(ids)) == len(ids)


# --- submit and poll -------------------------------------------------------------------------


async def submit(client: TestClient, text: str, headers: dict[str, str] = ASYNC) -> str:
    response = await client.post(PATH, data=request_body(text), headers=headers)
    assert response.status == 200, await response.text()
    assert response.headers["x-bf-async-status"] == "pending"
    job_id: str = (await response.json())["id"]
    return job_id


async def test_submit_answers_the_pending_message_shape(client: TestClient,
                                                        db: asyncpg.Connection) -> None:
    response = await client.post(PATH, data=request_body("hi"),
                                 headers={**ASYNC, "x-bf-async-job-result-ttl": "42"})
    assert response.status == 200
    assert response.headers["x-bf-async-status"] == "pending"
    data = await response.json()
    assert data == {
        "id": data["id"], "type": "message", "role": "assistant", "model": MODEL,
        "content": [], "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 0, "output_tokens": 0},
    }
    assert data["id"].startswith("job_")
    row = await db.fetchrow("SELECT status, ttl_seconds FROM jobs WHERE id = $1",
                            uuid.UUID(hex=data["id"].removeprefix("job_")))
    assert (row["status"], row["ttl_seconds"]) == ("pending", 42)


async def test_submit_when_the_queue_is_full_is_overloaded_and_leaves_no_job(
    make_client: MakeClient, db: asyncpg.Connection,
) -> None:
    limit = 2
    client = await make_client(queue_max_length=limit)
    accepted: list[str] = []
    for i in range(limit + 2):  # a quorum queue takes one message over its limit
        response = await client.post(PATH, data=request_body(f"job {i}"), headers=ASYNC)
        if response.status != 200:
            break
        accepted.append((await response.json())["id"])
    assert len(accepted) >= limit
    status, error_type, _ = await error_of(response)
    assert (status, error_type) == (529, "overloaded_error")
    rows = await db.fetch("SELECT id FROM jobs")
    assert {"job_" + r["id"].hex for r in rows} == set(accepted)


async def test_concurrent_submits_are_stored_queued_and_marked_published(
    make_client: MakeClient, db: asyncpg.Connection, broker: Broker,
) -> None:
    """Submits share batches; each is answered once stored and confirmed, and its row is
    marked published in the background (by the time the api has shut down: a row left
    unmarked would be published a second time by the reconciler)."""
    client = await make_client()
    responses = await asyncio.gather(*(
        client.post(PATH, data=request_body(f"job {i}"), headers=ASYNC) for i in range(50)))
    assert [r.status for r in responses] == [200] * 50
    ids = {uuid.UUID(hex=(await r.json())["id"].removeprefix("job_")) for r in responses}
    await client.close()
    rows = await db.fetch("SELECT id, published_at FROM jobs")
    assert {r["id"] for r in rows} == ids
    assert [r["id"] for r in rows if r["published_at"] is None] == []
    assert await broker.jobs_queue_depth() == 50


async def test_poll_of_a_pending_job(client: TestClient) -> None:
    job_id = await submit(client, "hi")
    response = await client.post(PATH, headers={**KEY_A, "x-bf-async-id": job_id})
    assert response.status == 200
    assert response.headers["x-bf-async-status"] == "pending"
    data = await response.json()
    assert (data["id"], data["content"], data["model"]) == (job_id, [], MODEL)


@pytest.mark.parametrize("poll_id", [
    "job_" + uuid.UUID(int=0).hex,
    "job_" + "0" * 31,
    "not-a-job-id",
    "",
])
async def test_poll_of_an_unknown_or_malformed_id_is_not_found(client: TestClient,
                                                                poll_id: str) -> None:
    response = await client.post(PATH, headers={**KEY_A, "x-bf-async-id": poll_id})
    status, error_type, _ = await error_of(response)
    assert (status, error_type) == (404, "not_found_error")


async def test_poll_of_someone_elses_job_is_not_found(client: TestClient) -> None:
    job_id = await submit(client, "mine")
    response = await client.post(PATH, headers={**KEY_B, "x-bf-async-id": job_id})
    status, error_type, _ = await error_of(response)
    assert (status, error_type) == (404, "not_found_error")
    # The same credential as a bearer token is the same caller.
    response = await client.post(
        PATH, headers={"authorization": "Bearer key-a", "x-bf-async-id": job_id})
    assert response.status == 200
