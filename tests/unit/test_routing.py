"""Provider routing: config loading, model prefixes, key pools, fallbacks (in memory)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path

import orjson
import pytest

from shared.errors import InvalidRequest
from shared.jobs import JobEnvelope
from shared.providers import ProviderConfigError, Route, load_providers
from shared.settings import Settings
from worker.main import resolve_key
from worker.pacing import KeyLimits, Pacer
from worker.providers.base import (
    CallContext,
    Provider,
    ProviderError,
    ProviderResponse,
    SSEEvent,
)
from worker.retry import Attempts, RetryLater, RetryPolicy
from worker.routing import KeyPool, ProviderEntry, ProviderSet, body_for_route, replace_model


def settings(**kw: object) -> Settings:
    base: dict[str, object] = {"anthropic_api_key": None, "openai_api_key": None,
                               "openai_base_url": None, "providers_file": None}
    return Settings(**{**base, **kw})


# --- configuration and routes ------------------------------------------------------------

def test_env_only_configures_anthropic() -> None:
    assert load_providers(settings()).names() == ["anthropic"]


def test_openai_from_env() -> None:
    providers = load_providers(settings(openai_api_key="sk-o"))
    assert providers.names() == ["anthropic", "openai"]
    assert providers.configs["openai"].base_url == "https://api.openai.com/v1"
    assert [k.key for k in providers.configs["openai"].keys] == ["sk-o"]


@pytest.mark.parametrize("model, route", [
    ("claude-sonnet-4-5", Route("anthropic", "claude-sonnet-4-5")),
    ("anthropic/claude-x", Route("anthropic", "claude-x")),
    ("openai/gpt-4o", Route("openai", "gpt-4o")),
    ("groq/meta-llama/llama-3-70b", Route("groq", "meta-llama/llama-3-70b")),
])
def test_route(tmp_path: Path, model: str, route: Route) -> None:
    file = tmp_path / "p.toml"
    file.write_text('[providers.groq]\ntype = "openai"\nbase_url = "http://g/v1"\n')
    providers = load_providers(settings(openai_base_url="http://o/v1", providers_file=str(file)))
    assert providers.route(model) == route


@pytest.mark.parametrize("model, message", [
    ("mistral/large", "model: provider 'mistral' is not configured; configured providers: "
                      "anthropic, openai"),
    ("openai/", "model: 'openai/' names no model after the provider prefix"),
])
def test_route_rejects(model: str, message: str) -> None:
    providers = load_providers(settings(openai_base_url="http://o/v1"))
    with pytest.raises(InvalidRequest) as exc:
        providers.route(model)
    assert exc.value.message == message


ALIASES = (
    '[providers.openai]\ntype = "openai"\nbase_url = "http://o/v1"\nmodels = ["gpt-5"]\n'
    '[models.smart]\nroute = "anthropic/claude-opus-4-7"\nfallbacks = ["openai/gpt-5"]\n'
    '[models.cheap]\nroute = "openai/gpt-5-mini"\n'
)


@pytest.mark.parametrize("model, header, primary, fallbacks", [
    ("smart", None, Route("anthropic", "claude-opus-4-7"), (Route("openai", "gpt-5"),)),
    ("cheap", None, Route("openai", "gpt-5-mini"), ()),
    # the header replaces the alias's chain; it may name aliases too
    ("smart", "cheap, openai/gpt-4o", Route("anthropic", "claude-opus-4-7"),
     (Route("openai", "gpt-5-mini"), Route("openai", "gpt-4o"))),
    ("claude-x", "openai/gpt-5", Route("anthropic", "claude-x"), (Route("openai", "gpt-5"),)),
    ("claude-x", "", Route("anthropic", "claude-x"), ()),
])
def test_aliases_and_the_fallbacks_header(tmp_path: Path, model: str, header: str | None,
                                          primary: Route, fallbacks: tuple[Route, ...]) -> None:
    file = tmp_path / "p.toml"
    file.write_text(ALIASES)
    resolution = load_providers(settings(providers_file=str(file))).resolve(model, header)
    assert (resolution.primary, resolution.fallbacks) == (primary, fallbacks)


@pytest.mark.parametrize("header, message", [
    ("mistral/large", "x-ferry-fallbacks fallback 'mistral/large': provider 'mistral' is not "
                      "configured; configured providers: anthropic, openai"),
    ("a,b,c,d,e,f", "x-ferry-fallbacks: at most 5 routes, got 6"),
])
def test_a_bad_fallbacks_header_is_a_bad_request(tmp_path: Path, header: str,
                                                 message: str) -> None:
    file = tmp_path / "p.toml"
    file.write_text(ALIASES)
    with pytest.raises(InvalidRequest) as exc:
        load_providers(settings(providers_file=str(file))).resolve("claude-x", header)
    assert exc.value.message == message


def test_configured_models_are_the_known_metric_labels(tmp_path: Path) -> None:
    file = tmp_path / "p.toml"
    file.write_text(ALIASES)
    assert load_providers(settings(providers_file=str(file))).known_models() == {
        "smart", "cheap", "gpt-5", "openai/gpt-5"}


def test_file_with_keys_and_weights(tmp_path: Path) -> None:
    file = tmp_path / "p.toml"
    file.write_text(
        '[providers.openai]\ntype = "openai"\nbase_url = "http://o/v1"\n'
        'keys = [{ key = "sk-a", weight = 3 }, { key = "env:SECOND" }]\nmax_attempts = 2\n'
    )
    config = load_providers(settings(providers_file=str(file))).configs["openai"]
    assert [(k.key, k.weight) for k in config.keys] == [("sk-a", 3.0), ("env:SECOND", 1.0)]
    assert config.max_attempts == 2
    assert resolve_key("env:SECOND", {"SECOND": "sk-b"}) == "sk-b"
    with pytest.raises(ValueError, match=r"\$SECOND"):
        resolve_key("env:SECOND", {})


@pytest.mark.parametrize("text, fragment", [
    ('[providers.x]\ntype = "grpc"\nbase_url = "u"\n', "providers.x"),
    ('[providers.x]\ntype = "openai"\n', "base_url"),
    ('[providers.x]\ntype = "openai"\nbase_url = "u"\ncolour = 1\n', "colour"),
    ("providers = 3\n", "expected [providers.NAME] or [models.NAME] tables"),
    ('[models.smart]\nroute = "mistral/large"\n', "models.smart: model: provider 'mistral'"),
    ('[models.smart]\nroute = "a"\nfallbacks = ["a","b","c","d","e","f"]\n', "models.smart"),
    ("[providers.x\n", "cannot read providers file"),
])
def test_bad_file(tmp_path: Path, text: str, fragment: str) -> None:
    file = tmp_path / "p.toml"
    file.write_text(text)
    with pytest.raises(ProviderConfigError, match=fragment.replace("[", r"\[")):
        load_providers(settings(providers_file=str(file)))


def test_body_for_route_keeps_bytes_when_nothing_changes() -> None:
    body = b'{"model":"claude-x","max_tokens":5,"messages":[]}'
    assert body_for_route(body, Route("anthropic", "claude-x"), "claude-x") is body


def test_body_for_route_replaces_only_the_model() -> None:
    # Anthropic's own `fallbacks` is forwarded; every byte but the model's value stays.
    body = (b'{ "fallbacks":["a/b"], "model" : "openai/gpt-4o","max_tokens":5,'
            b'"x":123456789012345678901234567890,"y":1e400,"z":"\\u00e9","n":{"model":"k"}}')
    out = body_for_route(body, Route("openai", "gpt-4o"), "openai/gpt-4o")
    assert out == body.replace(b'"openai/gpt-4o"', b'"gpt-4o"')


@pytest.mark.parametrize("body", [b"[1]", b'{"max_tokens": 5}', b'{"model": "a", oops}'])
def test_replace_model_refuses_what_it_cannot_rewrite(body: bytes) -> None:
    with pytest.raises(ValueError):
        replace_model(body, "b")


# --- key pool ------------------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_key_weights() -> None:
    import random

    pool = KeyPool([("a", 3.0), ("b", 1.0)], 60, rng=random.Random(7))
    picks = [pool.pick() for _ in range(4000)]
    assert 0.70 < picks.count("a") / len(picks) < 0.80


def test_the_key_whose_turn_comes_first() -> None:
    import random

    pool = KeyPool([("a", 1.0), ("b", 1.0), ("c", 1.0)], 60, rng=random.Random(7))
    waits: dict[str, float | None] = {"a": 0.5, "b": 0.2, "c": 0.9}
    assert {pool.pick(waits.get) for _ in range(50)} == {"b"}
    waits["c"] = None  # nothing known of it yet: its first call learns its limit
    assert {pool.pick(waits.get) for _ in range(50)} == {"c"}
    # Keys equally free are chosen by what they allow.
    waits = {"a": 0.0, "b": 0.0, "c": 1.0}
    rates = {"a": 30.0, "b": 10.0, "c": 100.0}
    picks = [pool.pick(waits.get, rates.get) for _ in range(4000)]
    assert "c" not in picks
    assert 0.70 < picks.count("a") / len(picks) < 0.80


def test_unauthorised_key_cools_down() -> None:
    clock = Clock()
    pool = KeyPool([("a", 1.0), ("b", 1.0)], 60, clock=clock)
    pool.report("a", ProviderError(401, None, "bad key"))
    assert {pool.pick() for _ in range(50)} == {"b"}
    clock.now += 61
    assert {pool.pick() for _ in range(200)} == {"a", "b"}


def test_rate_limited_key_sits_out_retry_after() -> None:
    clock = Clock()
    pool = KeyPool([("a", 1.0), ("b", 1.0)], 60, clock=clock)
    pool.report("b", ProviderError(429, None, "slow down", retry_after=5))
    assert {pool.pick() for _ in range(50)} == {"a"}
    assert not pool.has_other("a")
    clock.now += 6
    assert pool.has_other("a")


def test_all_keys_cooling_uses_first_to_recover() -> None:
    clock = Clock()
    pool = KeyPool([("a", 1.0), ("b", 1.0)], 60, clock=clock)
    pool.report("a", ProviderError(403, None, "no"))
    clock.now += 10
    pool.report("b", ProviderError(403, None, "no"))
    assert pool.pick() == "a"


# --- provider set: retries, key rotation, fallbacks --------------------------------------

class Scripted:
    """A provider whose answers are scripted per call; records the keys and bodies it saw."""

    name = "scripted"

    def __init__(self, outcomes: list[ProviderError | None]) -> None:
        self.outcomes = outcomes
        self.keys: list[str | None] = []
        self.bodies: list[bytes] = []

    async def create_message(self, body: bytes, ctx: CallContext) -> ProviderResponse:
        self.keys.append(ctx.api_key)
        self.bodies.append(body)
        outcome = self.outcomes.pop(0) if self.outcomes else None
        if outcome is not None:
            raise outcome
        return ProviderResponse(body=b'{"type":"message"}', stop_reason="end_turn")

    async def stream_message(self, body: bytes, ctx: CallContext) -> AsyncIterator[SSEEvent]:
        raise NotImplementedError
        yield  # pragma: no cover


def entry(provider: Scripted, keys: tuple[str, ...] = ("k",), attempts: int = 3) -> ProviderEntry:
    return ProviderEntry(provider, KeyPool([(k, 1.0) for k in keys], 60),
                         RetryPolicy(attempts, 0.0, 1.0))


def envelope(model: str = "claude-x", provider: str = "anthropic",
             fallbacks: tuple[str, ...] = ()) -> JobEnvelope:
    body = orjson.dumps({"model": model, "max_tokens": 5, "messages": []})
    upstream = model.partition("/")[2] or model
    return JobEnvelope(job_id=uuid.uuid4(), model=model, provider=provider,
                       upstream_model=upstream, fallbacks=fallbacks, body=body)


async def create(provider, body, ctx):  # type: ignore[no-untyped-def]
    return await provider.create_message(body, ctx)


def err(status: int, retry_after: float | None = None) -> ProviderError:
    return ProviderError(status, None, f"failure {status}", retry_after=retry_after)


async def test_retries_then_succeeds() -> None:
    primary = Scripted([err(503), err(529)])
    attempts = Attempts()
    _, route = await ProviderSet({"anthropic": entry(primary)}).call(envelope(), create, attempts)
    assert route == Route("anthropic", "claude-x") and attempts.count == 3


async def test_fallback_after_retries_and_prefix_stripped() -> None:
    primary, backup = Scripted([err(503)] * 3), Scripted([])
    providers = ProviderSet({"anthropic": entry(primary), "openai": entry(backup)})
    attempts = Attempts()
    _, route = await providers.call(envelope(fallbacks=("openai/gpt-4o",)), create, attempts)
    assert route == Route("openai", "gpt-4o")
    assert attempts.count == 4
    assert orjson.loads(backup.bodies[0])["model"] == "gpt-4o"


async def test_no_fallback_for_client_errors() -> None:
    primary, backup = Scripted([err(400)]), Scripted([])
    providers = ProviderSet({"anthropic": entry(primary), "openai": entry(backup)})
    with pytest.raises(ProviderError) as exc:
        await providers.call(envelope(fallbacks=("openai/gpt-4o",)), create, Attempts())
    assert exc.value.status == 400 and backup.bodies == []


async def test_401_moves_to_the_next_key_at_once() -> None:
    primary = Scripted([err(401)])
    providers = ProviderSet({"anthropic": entry(primary, keys=("a", "b"))})
    await providers.call(envelope(), create, Attempts())
    assert len(primary.keys) == 2 and set(primary.keys) == {"a", "b"}


async def test_401_with_a_single_key_fails() -> None:
    primary = Scripted([err(401)])
    with pytest.raises(ProviderError) as exc:
        await ProviderSet({"anthropic": entry(primary)}).call(envelope(), create, Attempts())
    assert exc.value.status == 401 and primary.keys == ["k"]


async def test_long_wait_becomes_retry_later_only_without_fallbacks() -> None:
    primary = Scripted([err(429, retry_after=20)])
    providers = ProviderSet({"anthropic": entry(primary)})
    with pytest.raises(RetryLater) as exc:
        await providers.call(envelope(), create, Attempts(), max_inline_wait=5)
    assert exc.value.delay == pytest.approx(20, abs=0.5)

    primary, backup = Scripted([err(429, retry_after=20)]), Scripted([])
    providers = ProviderSet({"anthropic": entry(primary), "openai": entry(backup)})
    _, route = await providers.call(envelope(fallbacks=("openai/gpt-4o",)), create, Attempts(),
                                    max_inline_wait=5)
    assert route.provider == "openai"


async def test_delayed_retry_resumes_the_attempt_count() -> None:
    primary = Scripted([err(503)] * 5)
    attempts = Attempts()
    with pytest.raises(ProviderError):
        await ProviderSet({"anthropic": entry(primary, attempts=3)}).call(
            envelope(), create, attempts, prior=2)
    assert len(primary.bodies) == 1 and attempts.count == 1


# --- pacing: a stream holds its place in flight until its last event -------------------------


async def test_a_stream_keeps_its_place_among_max_concurrency_until_closed() -> None:
    async def stream(provider: Provider, body: bytes, ctx: CallContext
                     ) -> tuple[SSEEvent, AsyncGenerator[SSEEvent, None]]:
        async def rest() -> AsyncGenerator[SSEEvent, None]:
            yield SSEEvent("message_stop", b"{}")

        return SSEEvent("message_start", b"{}"), rest()

    pacer = Pacer(None, {("anthropic", "k"): KeyLimits(max_concurrency=1)})
    providers = ProviderSet({"anthropic": entry(Scripted([]))}, pacer=pacer)
    (first, events), _ = await providers.call(envelope(), stream, Attempts())
    assert first.event == "message_start"
    with pytest.raises(ProviderError) as refused:  # the one place is the open stream's
        await providers.call(envelope(), create, Attempts())
    assert refused.value.status == 429
    assert [e.event async for e in events] == ["message_stop"]
    await events.aclose()
    await asyncio.sleep(0)  # the place is given back in the background
    _, route = await providers.call(envelope(), create, Attempts())
    assert route.provider == "anthropic"
