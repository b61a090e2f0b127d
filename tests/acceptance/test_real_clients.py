"""Real clients against Ferry's real processes: the TypeScript SDK and Claude Code from npm
(pinned in tests/clients/package.json), and the form of every request shape of tests/corpus
(test_corpus.py replays them).

A gateway that forwards what Anthropic accepts must let all of these through; the fake provider
behind the stack answers `echo: <last user text>`, so each answer shows the request got there.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from tests.acceptance.clients import CLIENT_KEY, install_clients, run_claude, run_sdk
from tests.acceptance.stack import Stack, running_stack
from tests.conftest import TestRun
from tests.support import fake_calls

pytestmark = pytest.mark.acceptance

MODEL = "claude-ferry-test"  # any name: the fake provider answers them all
CLAUDE_CODE_VERSION = "2.1.332"
CLAUDE_CODE_DEFAULT_MODEL = "claude-opus-5-5"  # what 2.1.332 asks for without --model
CORPUS = Path(__file__).resolve().parents[1] / "corpus"
CORPUS_FILES = sorted(CORPUS.glob("*.json"))
STREAM_EVENTS = {"message_start", "content_block_start", "content_block_delta",
                 "content_block_stop", "message_delta", "message_stop"}


def unique(text: str) -> str:
    return f"{text} {uuid.uuid4().hex[:12]}"


def word() -> str:
    """A token that survives any tokenisation of a prompt: letters and digits only."""
    return "ferry" + uuid.uuid4().hex[:12]


@pytest.fixture(scope="module")
def clients() -> None:
    """The pinned clients, installed; skips only when node/npm are absent."""
    install_clients()


@pytest_asyncio.fixture(scope="module")
async def ferry(test_run: TestRun,
                tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    # FERRY_AUTH=keys, the default: the clients present a key made with `ferry keys create`.
    async with running_stack(test_run, tmp_path_factory.mktemp("ferry-clients"), "clients",
                             workers=2, env={"FERRY_AUTH": "keys"}) as stack:
        await stack.create_key("real-clients", "--secret", CLIENT_KEY)
        yield stack


def base_url(stack: Stack) -> str:
    return f"{stack.url}/anthropic"


# --- the TypeScript SDK ---------------------------------------------------------------------


async def test_ts_sdk_create(clients: None, ferry: Stack) -> None:
    text = unique("ts create")
    run = run_sdk("create", base_url(ferry), options={"text": text, "model": MODEL})
    assert run.returncode == 0 and run.failed is None, run.explain()
    out = run.output
    assert (out["type"], out["role"], out["model"]) == ("message", "assistant", MODEL), out
    assert out["text"] == f"echo: {text}", out
    assert out["stop_reason"] == "end_turn", out
    calls = await fake_calls(ferry.fake_url, text)
    assert [(c["model"], c["stream"]) for c in calls] == [(MODEL, False)], calls


async def test_ts_sdk_stream(clients: None, ferry: Stack) -> None:
    text = unique("ts stream")
    run = run_sdk("stream", base_url(ferry), options={"text": text, "model": MODEL})
    assert run.returncode == 0 and run.failed is None, run.explain()
    out = run.output
    assert out["text"] == f"echo: {text}", out
    assert STREAM_EVENTS <= set(out["event_types"]), out
    assert out["stop_reason"] == "end_turn", out
    calls = await fake_calls(ferry.fake_url, text)
    assert [(c["model"], c["stream"]) for c in calls] == [(MODEL, True)], calls


async def test_ts_sdk_count_tokens(clients: None, ferry: Stack) -> None:
    run = run_sdk("count_tokens", base_url(ferry),
                  options={"text": unique("ts count these words"), "model": MODEL})
    assert run.returncode == 0 and run.failed is None, run.explain()
    tokens = run.output["input_tokens"]
    assert isinstance(tokens, int) and tokens > 0, run.output


async def test_ts_sdk_models_list(clients: None, ferry: Stack) -> None:
    run = run_sdk("models_list", base_url(ferry), options={"limit": 1})
    assert run.returncode == 0 and run.failed is None, run.explain()
    out = run.output
    first = out["first_page"]
    assert len(first) == 1, out  # limit=1
    assert all(m["type"] == "model" and isinstance(m["id"], str) and m["id"] for m in first), out
    ids = out["all_ids"]
    assert len(ids) == len(set(ids)), f"pagination repeated a model: {ids}"
    assert first[0]["id"] == ids[0], out
    if out["has_more"]:
        assert len(ids) > 1, out


async def test_ts_sdk_models_get(clients: None, ferry: Stack) -> None:
    run = run_sdk("models_get", base_url(ferry))
    assert run.returncode == 0 and run.failed is None, run.explain()
    out = run.output
    assert out["id"] == out["asked"] and out["type"] == "model", out


async def test_ts_sdk_beta_create(clients: None, ferry: Stack) -> None:
    text = unique("ts beta")
    betas = ["context-management-2025-06-27", "token-counting-2024-11-01"]
    run = run_sdk("beta_create", base_url(ferry),
                  options={"text": text, "model": MODEL, "betas": betas})
    assert run.returncode == 0 and run.failed is None, run.explain()
    assert run.output["text"] == f"echo: {text}", run.output
    calls = await fake_calls(ferry.fake_url, text)
    assert len(calls) == 1, calls
    sent = {b.strip() for b in calls[0]["headers"].get("anthropic-beta", "").split(",")}
    assert set(betas) <= sent, f"the provider got anthropic-beta {sent}, the client sent {betas}"


async def test_ts_sdk_error(clients: None, ferry: Stack) -> None:
    """No messages at all: a request Ferry itself must refuse, as Anthropic would."""
    run = run_sdk("error", base_url(ferry), options={"model": MODEL, "messages": []})
    assert run.returncode == 0, run.explain()
    raised = run.output["raised"]
    assert raised is not None, "the SDK got an answer to a request without messages"
    assert (raised["class"], raised["status"], raised["error_type"]) == (
        "BadRequestError", 400, "invalid_request_error"), raised
    assert str(raised["request_id"]).startswith("req_"), raised


# --- Claude Code ----------------------------------------------------------------------------


async def _new_calls(stack: Stack, before: int) -> list[dict[str, Any]]:
    return (await fake_calls(stack.fake_url))[before:]


async def test_claude_code_print(clients: None, ferry: Stack, tmp_path: Path) -> None:
    token = word()
    run = run_claude(["-p", f"say {token}"], base_url(ferry), tmp_path)
    assert run.returncode == 0, run.explain()
    assert f"say {token}" in run.stdout, run.explain()  # echo: <reminder> say <token>
    assert run.egress == [], f"Claude Code tried to leave the base URL: {run.egress}"
    calls = [c for c in await fake_calls(ferry.fake_url) if token in (c["text"] or "")]
    assert [(c["model"], c["stream"], c["status"]) for c in calls] == [
        (CLAUDE_CODE_DEFAULT_MODEL, True, 200)], calls


async def test_claude_code_stream_json(clients: None, ferry: Stack, tmp_path: Path) -> None:
    token = word()
    run = run_claude(["-p", f"say {token}", "--output-format", "stream-json", "--verbose"],
                     base_url(ferry), tmp_path)
    assert run.returncode == 0, run.explain()
    events = run.json_lines()
    init = next(e for e in events if e.get("type") == "system" and e.get("subtype") == "init")
    assert init["model"] == CLAUDE_CODE_DEFAULT_MODEL, init
    assert init["claude_code_version"] == CLAUDE_CODE_VERSION, init
    assert any(e.get("type") == "assistant" for e in events), events
    result = events[-1]
    assert result.get("type") == "result", result
    assert (result["subtype"], result["is_error"]) == ("success", False), result
    assert f"say {token}" in result["result"], result
    assert run.egress == [], f"Claude Code tried to leave the base URL: {run.egress}"
    calls = [c for c in await fake_calls(ferry.fake_url) if token in (c["text"] or "")]
    assert [(c["model"], c["stream"]) for c in calls] == [(CLAUDE_CODE_DEFAULT_MODEL, True)], calls


async def test_claude_code_tool_round_trip(clients: None, ferry: Stack, tmp_path: Path) -> None:
    """The provider asks for a tool; Claude Code answers with a tool_result (an error, as the
    fake's input does not fit Read) in a second request, which must get through as well."""
    token = word()
    before = len(await fake_calls(ferry.fake_url))
    run = run_claude(["-p", f"[[fake:tool=Read]] read {token}", "--output-format",
                      "stream-json", "--verbose"], base_url(ferry), tmp_path)
    assert run.returncode == 0, run.explain()
    result = run.json_lines()[-1]
    assert (result.get("type"), result.get("is_error")) == ("result", False), result
    assert result["num_turns"] == 2, result
    calls = await _new_calls(ferry, before)
    assert [c["status"] for c in calls] == [200, 200], calls
    assert token in calls[0]["text"], calls


async def test_claude_code_context_counts_tokens(clients: None, ferry: Stack,
                                                 tmp_path: Path) -> None:
    """`/context` calls count_tokens (with ?beta=true) for each part of the prompt; when that
    fails Claude Code logs it and falls back to estimates."""
    run = run_claude(["-p", "/context"], base_url(ferry), tmp_path)
    assert run.returncode == 0, run.explain()
    assert "/v1/messages/count_tokens source=count_tokens" in run.debug_log, run.explain()
    failures = [line for line in run.debug_log.splitlines()
                if "countTokens API call failed" in line]
    assert failures == [], f"{len(failures)} count_tokens calls failed, e.g. {failures[:3]}"
    assert run.egress == [], f"Claude Code tried to leave the base URL: {run.egress}"


# --- the request-shape corpus ---------------------------------------------------------------


def _load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


@pytest.mark.parametrize("path", CORPUS_FILES, ids=[p.stem for p in CORPUS_FILES])
def test_corpus_shape_is_a_request_anthropic_accepts_in_form(path: Path) -> None:
    shape = _load(path)
    assert shape["name"] == path.stem
    assert shape["source"] == "reference" or shape["source"].startswith("claude-code ")
    assert shape["path"] in ("/v1/messages", "/v1/messages/count_tokens"), shape["path"]
    assert not {"x-api-key", "authorization"} & {h.lower() for h in shape["headers"]}
    body = shape["body"]
    assert isinstance(body.get("model"), str) and body["model"]
    if shape["path"] == "/v1/messages":
        assert type(body.get("max_tokens")) is int and body["max_tokens"] >= 0
    messages = body.get("messages")
    assert isinstance(messages, list) and messages
    for message in messages:
        assert isinstance(message.get("role"), str), message
        content = message.get("content")
        assert isinstance(content, (str, list)), message
        if isinstance(content, list):
            assert all(isinstance(b, dict) and isinstance(b.get("type"), str) for b in content)
