"""Job ids as clients see them, and the caller hash that binds a job to its credential."""

from __future__ import annotations

import uuid

import pytest

from shared.jobs import (
    JOB_ID_PREFIX,
    JobEnvelope,
    Reply,
    _frame,
    caller_hash,
    format_job_id,
    new_job_id,
    parse_job_id,
)

KNOWN = uuid.UUID("0123456789abcdef0123456789abcdef")


def test_format_job_id() -> None:
    assert format_job_id(KNOWN) == "job_0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize("job_id", [KNOWN, uuid.UUID(int=0), uuid.UUID(int=2**128 - 1)],
                         ids=["known", "zero", "max"])
def test_round_trip(job_id: uuid.UUID) -> None:
    text = format_job_id(job_id)
    assert text.startswith(JOB_ID_PREFIX)
    assert parse_job_id(text) == job_id


def test_new_ids_are_random_and_round_trip() -> None:
    ids = [new_job_id() for _ in range(1000)]
    assert len(set(ids)) == len(ids)
    assert all(parse_job_id(format_job_id(i)) == i for i in ids)


@pytest.mark.parametrize("text", [
    pytest.param(" job_0123456789abcdef0123456789abcdef\n", id="surrounding_whitespace"),
    # uuid.UUID(hex=...) is case-insensitive, and an uppercase id names the same job.
    pytest.param("job_0123456789ABCDEF0123456789ABCDEF", id="uppercase_hex"),
])
def test_lenient_forms_parse_to_the_same_job(text: str) -> None:
    assert parse_job_id(text) == KNOWN


@pytest.mark.parametrize("text", [
    pytest.param("", id="empty"),
    pytest.param("job_", id="prefix_only"),
    pytest.param("0123456789abcdef0123456789abcdef", id="no_prefix"),
    pytest.param("msg_0123456789abcdef0123456789abcdef", id="wrong_prefix"),
    pytest.param("JOB_0123456789abcdef0123456789abcdef", id="uppercase_prefix"),
    pytest.param("job_0123456789abcdef0123456789abcde", id="one_short"),
    pytest.param("job_0123456789abcdef0123456789abcdef0", id="one_long"),
    pytest.param("job_0123456789abcdef0123456789abcdeg", id="non_hex"),
    pytest.param("job_01234567-89ab-cdef-0123-456789abcdef", id="dashed_uuid"),
    pytest.param("job_01234567-89ab-cdef-0123-456789ab", id="dashed_right_length"),
    pytest.param("job_{123456789abcdef0123456789abcde}", id="braced_right_length"),
    pytest.param("job_0123456789abcdef 123456789abcdef", id="inner_space"),
])
def test_malformed_ids_are_rejected(text: str) -> None:
    assert parse_job_id(text) is None


# --- caller_hash ---------------------------------------------------------------------------------


@pytest.mark.parametrize("authorization", [
    "Bearer sk-ant-123", "bearer sk-ant-123", "BEARER sk-ant-123", "Bearer  sk-ant-123 ",
])
def test_same_key_via_x_api_key_or_bearer_is_the_same_caller(authorization: str) -> None:
    # The anthropic SDK sends x-api-key, but newer versions (2.14) send Authorization: Bearer.
    assert caller_hash(None, authorization) == caller_hash("sk-ant-123", None)


def test_x_api_key_wins_when_both_are_sent() -> None:
    assert caller_hash("sk-a", "Bearer sk-b") == caller_hash("sk-a", None)


def test_different_keys_are_different_callers() -> None:
    hashes = {caller_hash(f"sk-{n}", None) for n in range(100)}
    hashes |= {caller_hash(None, f"Bearer sk-x{n}") for n in range(100)}
    assert len(hashes) == 200


def test_keyed_caller_differs_from_anonymous() -> None:
    assert caller_hash("sk-a", None) != caller_hash(None, None)
    assert caller_hash(None, "Bearer sk-a") != caller_hash(None, None)


@pytest.mark.parametrize(("api_key", "authorization"), [
    ("sk-ant-secret-key-0001", None),
    (None, "Bearer sk-ant-secret-key-0001"),
])
def test_hash_never_contains_the_key(api_key: str | None, authorization: str | None) -> None:
    secret = "sk-ant-secret-key-0001"
    digest = caller_hash(api_key, authorization)
    assert len(digest) == 32
    assert secret.encode() not in digest
    assert secret not in digest.hex()
    assert secret.encode().hex() not in digest.hex()


def test_keepalive_travels_with_a_sync_request_and_its_started_reply() -> None:
    envelope = JobEnvelope(job_id=KNOWN, model="m", body=b"{}", mode="sync", keepalive_s=5.0)
    assert JobEnvelope.decode(KNOWN, envelope.encode(), "replies").keepalive_s == 5.0
    started = Reply(kind="started", alive_s=5.0)
    assert Reply.decode(started.encode()).alive_s == 5.0


def test_without_keepalive_nothing_is_asked_or_promised() -> None:
    """What an older api sends, and what an older worker answers: no keepalive either way."""
    envelope = JobEnvelope(job_id=KNOWN, model="m", body=b"{}", mode="sync")
    assert b"alive" not in envelope.encode()
    assert JobEnvelope.decode(KNOWN, envelope.encode(), "replies").keepalive_s is None
    assert Reply.decode(Reply(kind="started").encode()).alive_s is None


@pytest.mark.parametrize("value", [0, -1, "5", True, None, [5]])
def test_a_keepalive_that_is_not_a_positive_number_counts_as_none(value: object) -> None:
    data = _frame({"model": "m", "mode": "sync", "alive": value}, b"{}")
    assert JobEnvelope.decode(KNOWN, data, "replies").keepalive_s is None
    assert Reply.decode(_frame({"kind": "started", "alive": value}, b"")).alive_s is None
