"""`GET /v1/models` and `GET /v1/models/{id}`: Anthropic's paging over a fixed catalogue."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import anthropic
import pytest
import pytest_asyncio
from aiohttp import ClientSession

from fakeprovider.models import MODELS

Json = dict[str, Any]
IDS = [m.id for m in MODELS]


@pytest_asyncio.fixture(scope="module")
async def client(base_url: str) -> AsyncIterator[anthropic.AsyncAnthropic]:
    sdk = anthropic.AsyncAnthropic(base_url=base_url, api_key="k", max_retries=0)
    yield sdk
    await sdk.close()


async def get(http: ClientSession, url: str) -> tuple[int, Json]:
    async with http.get(url) as resp:
        return resp.status, await resp.json()


def test_the_catalogue_is_newest_first_and_has_the_usual_names() -> None:
    assert {"claude-sonnet-4-5", "claude-opus-4-7", "claude-haiku-4-5"} <= set(IDS)
    created = [datetime.fromisoformat(m.created_at) for m in MODELS]
    assert created == sorted(created, reverse=True)
    assert len(set(IDS)) == len(IDS) >= 5


@pytest.mark.parametrize("query", ["", "?beta=true"])
async def test_list_models(http: ClientSession, base_url: str, query: str) -> None:
    status, page = await get(http, f"{base_url}/v1/models{query}")
    assert status == 200
    assert [m["id"] for m in page["data"]] == IDS
    assert (page["has_more"], page["first_id"], page["last_id"]) == (False, IDS[0], IDS[-1])
    first = page["data"][0]
    assert first == {
        "id": "claude-opus-4-7",
        "type": "model",
        "display_name": "Claude Opus 4.7",
        "created_at": MODELS[0].created_at,
    }


async def test_paging_forward_and_back(http: ClientSession, base_url: str) -> None:
    url = f"{base_url}/v1/models"
    status, page = await get(http, f"{url}?limit=2")
    assert (status, [m["id"] for m in page["data"]], page["has_more"]) == (200, IDS[:2], True)
    status, page = await get(http, f"{url}?limit=2&after_id={page['last_id']}")
    assert ([m["id"] for m in page["data"]], page["has_more"]) == (IDS[2:4], True)
    assert (page["first_id"], page["last_id"]) == (IDS[2], IDS[3])
    _, last = await get(http, f"{url}?limit=5&after_id={IDS[3]}")
    assert ([m["id"] for m in last["data"]], last["has_more"]) == (IDS[4:], False)
    # before_id: the models just before it; has_more says whether even newer ones remain.
    _, back = await get(http, f"{url}?limit=2&before_id={IDS[4]}")
    assert ([m["id"] for m in back["data"]], back["has_more"]) == (IDS[2:4], True)
    _, top = await get(http, f"{url}?limit=3&before_id={IDS[2]}")
    assert ([m["id"] for m in top["data"]], top["has_more"]) == (IDS[:2], False)
    _, empty = await get(http, f"{url}?after_id={IDS[-1]}")
    assert empty == {"data": [], "has_more": False, "first_id": None, "last_id": None}


@pytest.mark.parametrize(
    "query",
    [
        "limit=0",
        "limit=1001",
        "limit=ten",
        "after_id=nope",
        f"after_id={IDS[0]}&before_id={IDS[2]}",
    ],
)
async def test_bad_list_queries(http: ClientSession, base_url: str, query: str) -> None:
    async with http.get(f"{base_url}/v1/models?{query}") as resp:
        assert resp.status == 400
        error = await resp.json()
        assert error["request_id"] == resp.headers["request-id"]
    assert error["error"]["type"] == "invalid_request_error"


async def test_limit_bounds_are_accepted(http: ClientSession, base_url: str) -> None:
    for limit in (1, 1000):
        status, page = await get(http, f"{base_url}/v1/models?limit={limit}")
        assert (status, len(page["data"])) == (200, min(limit, len(IDS)))


@pytest.mark.parametrize("query", ["", "?beta=true"])
async def test_get_one_model(http: ClientSession, base_url: str, query: str) -> None:
    status, model = await get(http, f"{base_url}/v1/models/claude-haiku-4-5{query}")
    assert (status, model["id"], model["type"]) == (200, "claude-haiku-4-5", "model")
    async with http.get(f"{base_url}/v1/models/claude-nonesuch{query}") as resp:
        assert resp.status == 404
        error = await resp.json()
        request_id = resp.headers["request-id"]
    assert error == {
        "type": "error",
        "error": {"type": "not_found_error", "message": "model: claude-nonesuch"},
        "request_id": request_id,
    }


async def test_models_through_the_sdk(client: anthropic.AsyncAnthropic) -> None:
    listed = [m.id async for m in client.models.list(limit=2)]  # the SDK follows has_more
    assert listed == IDS
    model = await client.models.retrieve("claude-sonnet-4-5")
    assert (model.id, model.display_name) == ("claude-sonnet-4-5", "Claude Sonnet 4.5")
    with pytest.raises(anthropic.NotFoundError):
        await client.models.retrieve("claude-nonesuch")


async def test_model_calls_are_recorded(http: ClientSession, base_url: str) -> None:
    async with http.delete(f"{base_url}/_fake/calls"):
        pass
    await get(http, f"{base_url}/v1/models?limit=1")
    await get(http, f"{base_url}/v1/models/claude-opus-4-7")
    async with http.get(f"{base_url}/_fake/calls") as resp:
        listed, one = await resp.json()
    assert (listed["method"], listed["path"], listed["query"], listed["model"]) == (
        "GET",
        "/v1/models",
        "limit=1",
        None,
    )
    assert (one["path"], one["model"], one["status"], one["finished"]) == (
        "/v1/models/claude-opus-4-7",
        "claude-opus-4-7",
        200,
        True,
    )
