"""The endpoints SDKs call next to Messages, through the official Python SDK, and the headers
that travel both ways."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import anthropic
import pytest
import pytest_asyncio

from tests.acceptance.interactive_support import providers_stack
from tests.acceptance.jobs import unique, user
from tests.acceptance.stack import Stack
from tests.conftest import TestRun
from tests.support import fake_calls

pytestmark = pytest.mark.acceptance

FAKE_MODELS = ["claude-opus-4-7", "claude-sonnet-4-6", "claude-opus-4-6", "claude-opus-4-5",
               "claude-haiku-4-5", "claude-sonnet-4-5"]  # the fake provider's own list


def providers_toml(stack: Stack) -> str:
    return f"""
[providers.openai]
type = "openai"
base_url = "{stack.fake_url}/v1"
keys = [{{ key = "sk-o" }}]
models = ["gpt-5", "gpt-5-mini"]

[models.smart]
route = "anthropic/claude-opus-4-7"
fallbacks = ["openai/gpt-5"]
display_name = "Smart"
"""


@pytest_asyncio.fixture(scope="module")
async def ferry(test_run: TestRun, tmp_path_factory: pytest.TempPathFactory
                ) -> AsyncIterator[Stack]:
    async with providers_stack(test_run, tmp_path_factory.mktemp("ferry-endpoints"),
                               "endpoints", providers_toml, workers=1) as stack:
        yield stack


@pytest_asyncio.fixture(scope="module")
async def client(ferry: Stack) -> AsyncIterator[anthropic.AsyncAnthropic]:
    sdk = ferry.client()
    yield sdk
    await sdk.close()


async def test_count_tokens_is_the_providers_count(ferry: Stack,
                                                   client: anthropic.AsyncAnthropic) -> None:
    text = unique("count these four words")
    counted = await client.messages.count_tokens(
        model="claude-x", messages=user(text), system="and these three",
        tools=[{"name": "lookup", "description": "finds things",
                "input_schema": {"type": "object"}}])
    [call] = await fake_calls(ferry.fake_url, text)
    assert call["path"] == "/v1/messages/count_tokens"
    assert counted.input_tokens > len(text.split())  # system and tools count too


async def test_count_tokens_for_an_openai_provider_is_a_clear_bad_request(
    ferry: Stack, client: anthropic.AsyncAnthropic
) -> None:
    with pytest.raises(anthropic.BadRequestError) as raised:
        await client.messages.count_tokens(model="openai/gpt-5", messages=user("hi"))
    assert raised.value.body["error"]["message"] == (  # type: ignore[index]
        "count_tokens is not available for OpenAI-compatible provider `openai`")


async def test_models_lists_aliases_configured_models_and_the_providers_own(
    client: anthropic.AsyncAnthropic
) -> None:
    ids = [model.id async for model in client.models.list(limit=3)]  # pages of 3
    assert ids == ["smart", *FAKE_MODELS, "openai/gpt-5", "openai/gpt-5-mini"]
    page = await client.models.list(limit=2, after_id="smart")
    assert [m.id for m in page.data] == FAKE_MODELS[:2] and page.has_more
    page = await client.models.list(limit=5, before_id="openai/gpt-5")
    assert [m.id for m in page.data] == FAKE_MODELS[1:]


async def test_a_model_is_retrieved_by_id(client: anthropic.AsyncAnthropic) -> None:
    smart = await client.models.retrieve("smart")
    assert (smart.id, smart.display_name, smart.type) == ("smart", "Smart", "model")
    gpt = await client.models.retrieve("openai/gpt-5")
    assert gpt.id == "openai/gpt-5"
    with pytest.raises(anthropic.NotFoundError):
        await client.models.retrieve("claude-unknown")


async def test_beta_messages_forward_their_betas(ferry: Stack,
                                                client: anthropic.AsyncAnthropic) -> None:
    text = unique("beta please")
    message = await client.beta.messages.create(
        model="claude-x", max_tokens=64, messages=user(text),  # type: ignore[arg-type]
        betas=["context-management-2025-06-27", "interleaved-thinking-2025-05-14"])
    assert message.content[0].text.endswith(text)  # type: ignore[union-attr]
    [call] = await fake_calls(ferry.fake_url, text)
    betas = [v for n, v in call["raw_headers"] if n == "anthropic-beta"]
    assert len(betas) == 1
    assert betas[0].split(",") == ["context-management-2025-06-27",
                                   "interleaved-thinking-2025-05-14"]


async def test_the_providers_headers_reach_the_client(ferry: Stack,
                                                      client: anthropic.AsyncAnthropic) -> None:
    text = unique("headers please")
    raw = await client.messages.with_raw_response.create(model="claude-x", max_tokens=64,
                                                         messages=user(text))
    [call] = await fake_calls(ferry.fake_url, text)
    assert raw.headers["request-id"] == call["request_id"]  # the provider's id
    assert raw.headers["x-ferry-request-id"].startswith("req_")  # Ferry's own
    assert raw.headers["x-ferry-request-id"] != raw.headers["request-id"]
    for kind in ("requests", "tokens", "input-tokens", "output-tokens"):
        for field in ("limit", "remaining", "reset"):
            assert f"anthropic-ratelimit-{kind}-{field}" in raw.headers
    assert raw.headers["server"] == "ferry"


async def test_the_client_credentials_never_reach_the_provider(
    ferry: Stack, client: anthropic.AsyncAnthropic
) -> None:
    text = unique("whose key")
    await client.messages.create(model="claude-x", max_tokens=16, messages=user(text),
                                 extra_headers={"authorization": "Bearer client-secret"})
    [call] = await fake_calls(ferry.fake_url, text)
    headers = dict(call["raw_headers"])
    assert headers["x-api-key"] == "sk-fake-upstream"  # the operator's key
    assert "authorization" not in headers
    assert "client-secret" not in str(call["raw_headers"])


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_the_base_url_answers(ferry: Stack, method: str) -> None:
    async with aiohttp.ClientSession() as http:
        for path in ("/", "/anthropic"):
            async with http.request(method, f"{ferry.url}{path}") as resp:
                if path == "/":
                    assert resp.status == 200
                else:  # an unknown path keeps the 404 envelope
                    assert resp.status == 404
                    if method == "GET":
                        assert (await resp.json())["error"]["type"] == "not_found_error"


async def test_a_large_body_is_accepted(ferry: Stack, client: anthropic.AsyncAnthropic) -> None:
    """Checked in the helper process (bodies over 1 MiB), forwarded as sent."""
    text = unique("big")
    blocks = [{"type": "text", "text": "x" * 300} for _ in range(10_000)]
    message = await client.messages.create(
        model="claude-x", max_tokens=8,
        messages=[{"role": "user", "content": [*blocks, {"type": "text", "text": text}]}])
    assert message.content
    calls = [c for c in await fake_calls(ferry.fake_url) if (c["text"] or "").endswith(text)]
    assert [c["status"] for c in calls] == [200]
