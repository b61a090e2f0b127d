"""Gateway keys end to end (FERRY_AUTH=keys, the default): two api processes, keys made with
`ferry keys create`, the admin API, limits that hold across both replicas, and no secret in any
log line or table."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aiohttp
import anthropic
import asyncpg
import pytest
import pytest_asyncio

from tests.acceptance.interactive_support import start_extra_api
from tests.acceptance.jobs import MODEL, poll, result, submit, unique, user
from tests.acceptance.stack import Stack, running_stack
from tests.conftest import TestRun
from tests.support import eventually, fake_calls

pytestmark = pytest.mark.acceptance

ADMIN_KEY = "admin-secret-for-tests"
UPSTREAM_KEY = "sk-fake-upstream"  # the stack's ANTHROPIC_API_KEY


@pytest_asyncio.fixture(scope="module")
async def ferry(test_run: TestRun, tmp_path_factory: pytest.TempPathFactory
                ) -> AsyncIterator[Stack]:
    async with running_stack(test_run, tmp_path_factory.mktemp("ferry-keys"), "keys",
                             workers=2, env={"FERRY_AUTH": "keys",
                                             "FERRY_ADMIN_KEY": ADMIN_KEY}) as stack:
        yield stack


@pytest_asyncio.fixture(scope="module")
async def second_api(ferry: Stack) -> str:
    """Another api replica of the same deployment (same database and broker)."""
    return await start_extra_api(ferry, "api-2")


@pytest_asyncio.fixture(scope="module")
async def secrets_made() -> list[str]:
    """Every key secret the tests created, for the final check that none leaked."""
    return []


async def new_key(ferry: Stack, made: list[str], *options: str) -> tuple[str, str]:
    name = unique("key").replace(" ", "-")
    secret = await ferry.create_key(name, *options)
    made.append(secret)
    return name, secret


def sdk(base: str, secret: str, retries: int = 0) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=f"{base}/anthropic", api_key=secret,
                                    max_retries=retries)


async def ask(client: anthropic.AsyncAnthropic, text: str, model: str = MODEL) -> Any:
    return await client.messages.create(model=model, max_tokens=16, messages=user(text))


async def test_a_key_works_by_every_header_bifrost_users_know(
    ferry: Stack, secrets_made: list[str]
) -> None:
    _, secret = await new_key(ferry, secrets_made)
    for header in ({"x-api-key": secret}, {"authorization": f"Bearer {secret}"},
                   {"x-bf-vk": secret}):
        text = unique("which header")
        async with aiohttp.ClientSession() as http, http.post(
                f"{ferry.url}/anthropic/v1/messages", headers={**header},
                json={"model": MODEL, "max_tokens": 8, "messages": user(text)}) as resp:
            assert resp.status == 200, await resp.text()
        assert len(await fake_calls(ferry.fake_url, text)) == 1


@pytest.mark.parametrize(("secret", "message"), [
    (None, "missing API key: send it as x-api-key, Authorization: Bearer, or x-bf-vk"),
    ("sk-ferry-not-a-key", "invalid API key"),
])
async def test_no_key_or_an_unknown_one_is_refused_before_any_upstream_call(
    ferry: Stack, secret: str | None, message: str
) -> None:
    text = unique("who are you")
    headers = {"x-api-key": secret} if secret else {}
    async with aiohttp.ClientSession() as http, http.post(
            f"{ferry.url}/anthropic/v1/messages", headers=headers,
            json={"model": MODEL, "max_tokens": 8, "messages": user(text)}) as resp:
        data = await resp.json()
    assert (resp.status, data["error"]) == (401, {"type": "authentication_error",
                                                  "message": message})
    assert data["request_id"] == resp.headers["request-id"]
    assert await fake_calls(ferry.fake_url, text) == []


async def test_a_revoked_key_stops_on_every_replica_at_once(
    ferry: Stack, second_api: str, secrets_made: list[str]
) -> None:
    name, secret = await new_key(ferry, secrets_made)
    first, second = sdk(ferry.url, secret), sdk(second_api, secret)
    try:
        await ask(first, unique("before"))
        await ask(second, unique("before"))  # both replicas have the key cached now
        done = await ferry.ferry("keys", "revoke", name)
        assert done.returncode == 0, done.stderr
        revoked_at = time.monotonic()

        async def refused() -> float | None:
            try:
                await ask(second, unique("after"))
            except anthropic.AuthenticationError as exc:
                assert exc.body["error"]["message"] == (  # type: ignore[index]
                    f"the API key {name!r} was revoked")
                return time.monotonic() - revoked_at
            return None

        # A hang guard, not the promise: the NOTIFY reaches the replica in milliseconds.
        seen_after = await eventually(refused, timeout=5, interval=0.02,
                                      what="the second replica to refuse the revoked key")
        print(f"revocation seen by the second api after {seen_after * 1000:.0f} ms")
        with pytest.raises(anthropic.AuthenticationError):
            await ask(first, unique("after"))
    finally:
        await first.close()
        await second.close()


async def test_a_model_outside_the_allowlist_is_forbidden(ferry: Stack,
                                                          secrets_made: list[str]) -> None:
    _, secret = await new_key(ferry, secrets_made, "--models", "claude-*,openai/gpt-5*")
    client = sdk(ferry.url, secret)
    try:
        assert (await ask(client, unique("allowed"), "claude-allowed")).content
        text = unique("forbidden")
        with pytest.raises(anthropic.PermissionDeniedError) as raised:
            await ask(client, text, "gpt-4o")
        assert "may not use model 'gpt-4o'" in raised.value.body["error"]["message"]  # type: ignore[index]
        with pytest.raises(anthropic.PermissionDeniedError):  # nor through a fallback chain
            await client.messages.create(model="claude-x", max_tokens=8, messages=user(text),
                                         extra_headers={"x-ferry-fallbacks": "anthropic/claude-x"})
        assert await fake_calls(ferry.fake_url, text) == []
    finally:
        await client.close()


async def test_two_keys_cannot_see_each_others_jobs(ferry: Stack,
                                                    secrets_made: list[str]) -> None:
    _, alice_secret = await new_key(ferry, secrets_made)
    _, bob_secret = await new_key(ferry, secrets_made)
    alice, bob = sdk(ferry.url, alice_secret), sdk(ferry.url, bob_secret)
    try:
        job = await submit(alice, unique("alice's"))
        await result(alice, job.id)
        with pytest.raises(anthropic.NotFoundError):
            await poll(bob, job.id)
    finally:
        await alice.close()
        await bob.close()


async def wait_for_quiet_minute() -> None:
    """Rate windows are clock minutes: start early in one, so a burst stays inside it."""
    while datetime.now(UTC).second >= 40:
        await asyncio.sleep(0.5)


async def test_requests_per_minute_hold_across_two_replicas(
    ferry: Stack, second_api: str, secrets_made: list[str]
) -> None:
    rpm = 20
    _, secret = await new_key(ferry, secrets_made, "--rpm", str(rpm))
    clients = [sdk(ferry.url, secret), sdk(second_api, secret)]
    await wait_for_quiet_minute()
    try:
        outcomes = await asyncio.gather(
            *(ask(clients[i % 2], unique("counted")) for i in range(2 * rpm)),
            return_exceptions=True)
    finally:
        for client in clients:
            await client.close()
    limited = [o for o in outcomes if isinstance(o, anthropic.RateLimitError)]
    answered = [o for o in outcomes if not isinstance(o, BaseException)]
    assert len(limited) + len(answered) == 2 * rpm, outcomes
    assert rpm <= len(answered) <= rpm * 1.1  # within 10 % with two replicas
    headers = limited[0].response.headers
    assert headers["anthropic-ratelimit-requests-limit"] == str(rpm)
    assert headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert 1 <= int(headers["retry-after"]) <= 60
    assert limited[0].body["error"]["type"] == "rate_limit_error"  # type: ignore[index]


async def test_pending_jobs_hold_across_two_replicas(
    ferry: Stack, second_api: str, secrets_made: list[str]
) -> None:
    limit = 10
    _, secret = await new_key(ferry, secrets_made, "--max-pending", str(limit))
    clients = [sdk(ferry.url, secret), sdk(second_api, secret)]
    try:
        outcomes = await asyncio.gather(
            *(submit(clients[i % 2], unique("[[fake:delay=3]] pending")) for i in range(30)),
            return_exceptions=True)
        accepted = [o for o in outcomes if not isinstance(o, BaseException)]
        limited = [o for o in outcomes if isinstance(o, anthropic.RateLimitError)]
        assert len(accepted) == limit and len(limited) == 30 - limit, outcomes
        for job in accepted:  # and once they finished, there is room again
            await result(clients[0], job.id)
        await submit(clients[1], unique("room again"))
    finally:
        for client in clients:
            await client.close()


async def test_a_full_concurrency_limit_answers_429_and_the_sdk_retries(
    ferry: Stack, secrets_made: list[str]
) -> None:
    _, secret = await new_key(ferry, secrets_made, "--concurrency", "1")
    patient = sdk(ferry.url, secret, retries=4)  # the SDK honours retry-after: 1
    impatient = sdk(ferry.url, secret)
    try:
        busy = asyncio.create_task(ask(impatient, unique("[[fake:delay=2]] holding")))
        await eventually(lambda: _started(ferry, "holding"), what="the slot to be taken")
        with pytest.raises(anthropic.RateLimitError) as raised:
            await ask(impatient, unique("no slot"))
        assert raised.value.response.headers["retry-after"] == "1"
        text = unique("waits its turn")
        assert (await ask(patient, text)).content  # retried until the slot was free
        assert len(await fake_calls(ferry.fake_url, text)) == 1
        await busy
    finally:
        await patient.close()
        await impatient.close()


async def _started(stack: Stack, word: str) -> bool:
    return any(word in (c["text"] or "") and not c["finished"]
               for c in await fake_calls(stack.fake_url))


async def test_tokens_per_minute_count_what_providers_report(
    ferry: Stack, secrets_made: list[str]
) -> None:
    _, secret = await new_key(ferry, secrets_made, "--tpm", "30")
    client = sdk(ferry.url, secret)
    await wait_for_quiet_minute()
    try:
        async def limited() -> anthropic.RateLimitError | None:
            try:  # each answer uses about 10 tokens; workers add them within a second
                await ask(client, unique("spend some tokens here"))
            except anthropic.RateLimitError as exc:
                return exc
            return None

        error = await eventually(limited, timeout=30, interval=0.3,
                                 what="the token budget to run out")
        assert error.response.headers["anthropic-ratelimit-tokens-limit"] == "30"
        assert error.response.headers["anthropic-ratelimit-tokens-remaining"] == "0"
    finally:
        await client.close()


async def test_the_admin_api_manages_keys(ferry: Stack) -> None:
    admin = {"x-api-key": ADMIN_KEY}
    base = f"{ferry.url}/admin/v1/keys"
    name = unique("admin-made").replace(" ", "-")
    async with aiohttp.ClientSession() as http:
        async with http.get(base, headers={"x-api-key": "wrong"}) as resp:
            assert resp.status == 401
        async with http.post(base, headers=admin,
                             json={"name": name, "rpm": 5, "models": ["claude-*"]}) as resp:
            created = await resp.json()
            assert resp.status == 201, created
        secret = created.pop("secret")
        assert created["limits"]["rpm"] == 5 and created["status"] == "active"
        async with http.patch(f"{base}/{name}", headers=admin,
                              json={"rpm": None, "concurrency": 3}) as resp:
            updated = await resp.json()
        assert updated["limits"] == {"rpm": None, "tpm": None, "concurrency": 3,
                                     "max_pending": None}
        async with http.get(base, headers=admin) as resp:
            listed = await resp.json()
        assert name in [k["name"] for k in listed["data"]]
        assert secret not in str(listed)
        client = sdk(ferry.url, secret)
        try:
            assert (await ask(client, unique("admin key works"))).content
            async with http.delete(f"{base}/{name}", headers=admin) as resp:
                assert (await resp.json())["status"] == "revoked"

            async def refused() -> bool:
                try:
                    await ask(client, unique("revoked"))
                except anthropic.AuthenticationError:
                    return True
                return False

            await eventually(refused, timeout=5, what="the revoked key to be refused")
        finally:
            await client.close()


async def test_no_secret_in_any_log_line_or_table(ferry: Stack, secrets_made: list[str]
                                                  ) -> None:
    """Runs last in this module: every key made above, the admin key and the provider key."""
    assert secrets_made, "the tests above made keys"
    secrets = [*secrets_made, ADMIN_KEY, UPSTREAM_KEY]
    for name in ferry.processes:
        text = ferry.logs[name].read_text(errors="replace")
        for secret in secrets:
            assert secret not in text, f"a secret in the log of {name}"
    conn = await asyncpg.connect(ferry.database_url)
    try:
        tables = [r["tablename"] for r in await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
        for table in tables:
            dump = str([tuple(r) for r in await conn.fetch(f'SELECT * FROM "{table}"')])
            for secret in secrets:
                assert secret not in dump, f"a secret in table {table}"
                assert secret.encode().hex() not in dump
    finally:
        await conn.close()
