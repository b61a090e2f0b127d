"""Webhook signing (checked by the Standard Webhooks reference implementation, not by Ferry's
own code), the payload, the retry schedule, the delay tiers, and the endpoint checks."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import ValidationError
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from shared import webhooks
from shared.broker import WEBHOOK_DELAY_TIERS_S, webhook_tier
from shared.settings import Settings

BODY = b'{"type":"async_job.completed","data":{"job_id":"job_1"}}'


def signed(secrets: list[str], body: bytes = BODY) -> dict[str, str]:
    return webhooks.request_headers(secrets, uuid.uuid4(), int(time.time()), body)


def test_a_signature_verifies_with_the_reference_implementation() -> None:
    secret = webhooks.new_secret()
    headers = signed([secret])
    assert Webhook(secret).verify(BODY, headers) == orjson.loads(BODY)
    assert headers["webhook-id"].startswith("msg_") and len(headers["webhook-id"]) == 36
    assert headers["content-type"] == "application/json"


def test_the_signature_covers_id_timestamp_and_body() -> None:
    secret = webhooks.new_secret()
    headers = signed([secret])
    for changed in ({**headers, "webhook-id": "msg_" + uuid.uuid4().hex},
                    {**headers, "webhook-timestamp": str(int(headers["webhook-timestamp"]) + 1)}):
        with pytest.raises(WebhookVerificationError):
            Webhook(secret).verify(BODY, changed)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(BODY.replace(b"job_1", b"job_2"), headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(webhooks.new_secret()).verify(BODY, headers)


def test_the_signature_is_the_hmac_the_spec_describes() -> None:
    """A second, hand-written check: HMAC-SHA256 of "id.timestamp.body", keyed with the
    base64-decoded secret after whsec_."""
    secret = "whsec_" + base64.b64encode(b"k" * 32).decode()
    mac = hmac.new(b"k" * 32, b"msg_1.1700000000." + BODY, hashlib.sha256).digest()
    assert webhooks.sign(secret, "msg_1", 1700000000, BODY) == \
        "v1," + base64.b64encode(mac).decode()


def test_during_a_rotation_both_secrets_sign() -> None:
    new, old = webhooks.new_secret(), webhooks.new_secret()
    headers = signed([new, old])
    assert len(headers["webhook-signature"].split(" ")) == 2
    assert Webhook(new).verify(BODY, headers) == Webhook(old).verify(BODY, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(webhooks.new_secret()).verify(BODY, headers)


def test_secrets_are_32_random_bytes() -> None:
    secrets = {webhooks.new_secret() for _ in range(100)}
    assert len(secrets) == 100
    for secret in secrets:
        assert secret.startswith("whsec_") and len(base64.b64decode(secret[6:])) == 32


def test_the_payload_embeds_the_response_byte_for_byte() -> None:
    job_id = uuid.uuid4()
    ended = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    response = b'{"id":"msg_x", "content" : [{"type":"text","text":"hi"}], "n": 1.50}'
    body = webhooks.payload(job_id=job_id, status="completed", http_status=None,
                            ended_at=ended, expires_at=ended + timedelta(hours=1),
                            model="claude-x", request_id="req_1", response=response)
    assert response in body
    assert orjson.loads(body) == {
        "type": "async_job.completed", "timestamp": "2026-01-02T03:04:05.678901Z",
        "data": {"job_id": f"job_{job_id.hex}", "status": "completed", "status_code": 200,
                 "result_expires_at": "2026-01-02T04:04:05.678901Z", "model": "claude-x",
                 "request_id": "req_1", "response": orjson.loads(response)}}
    failed = orjson.loads(webhooks.payload(
        job_id=job_id, status="failed", http_status=429, ended_at=ended, expires_at=ended,
        model="m", request_id=None, response=None))
    assert failed["type"] == "async_job.failed" and "response" not in failed["data"]
    assert failed["data"]["status_code"] == 429


@pytest.mark.parametrize(("status", "verdict"), [
    (200, "delivered"), (204, "delivered"), (299, "delivered"),
    (None, "retry"), (500, "retry"), (503, "retry"), (408, "retry"), (429, "retry"),
    (400, "failed"), (401, "failed"), (404, "failed"), (410, "failed"), (301, "failed"),
    (302, "failed"),
])
def test_what_an_answer_means(status: int | None, verdict: str) -> None:
    assert webhooks.verdict(status) == verdict


def test_the_default_schedule_doubles_from_30_s_up_to_30_min() -> None:
    """Nominal waits (jitter pinned to its middle): 30 s, 1, 2, 4, 8, 16 min, then 30 min."""
    middle = [webhooks.retry_delay(n, 30, 1800, uniform=lambda a, b: (a + b) / 2)
              for n in range(1, 8)]
    assert middle == [30, 60, 120, 240, 480, 960, 1800]


@pytest.mark.parametrize("attempt", range(1, 12))
def test_jitter_stays_within_20_percent_and_under_the_cap(attempt: int) -> None:
    nominal = min(0.2 * 2 ** (attempt - 1), 60)
    low = webhooks.retry_delay(attempt, 0.2, 60, uniform=lambda a, b: a)
    high = webhooks.retry_delay(attempt, 0.2, 60, uniform=lambda a, b: b)
    assert low == pytest.approx(nominal * 0.8)
    assert high == pytest.approx(min(nominal * 1.2, 60))
    for _ in range(50):
        assert low <= webhooks.retry_delay(attempt, 0.2, 60) <= high


def test_a_huge_attempt_number_does_not_overflow() -> None:
    assert webhooks.retry_delay(10_000, 30, 1800) <= 1800


@pytest.mark.parametrize(("delay", "tier"), [
    (0.2, 1), (1.0, 1), (1.6, 1), (4.9, 1), (5, 5), (29, 5), (45, 30), (300, 120),
    (599, 120), (1800, 600),
])
def test_a_wait_is_spent_in_the_tier_that_does_not_overshoot(delay: float, tier: int) -> None:
    assert webhook_tier(delay) == tier
    assert tier in WEBHOOK_DELAY_TIERS_S


@pytest.mark.parametrize(("value", "seconds"), [
    ("3", 3.0), (" 1.5 ", 1.5), ("-1", None), ("soon", None), (None, None),
    ("Wed, 21 Oct 2015 07:28:00 GMT", None),
])
def test_retry_after(value: str | None, seconds: float | None) -> None:
    assert webhooks.retry_after_s(value) == seconds


@pytest.mark.parametrize("url", [
    "https://hooks.example.com/ferry", "http://127.0.0.1:8080/h?x=1", "https://[::1]/h"])
def test_urls_taken(url: str) -> None:
    assert webhooks.check_url(url) == url


@pytest.mark.parametrize(("url", "why"), [
    ("ftp://x.example/", "http:// or https://"), ("hooks.example.com", "http:// or https://"),
    ("https://", "http:// or https://"), ("https://u:p@x.example/", "no credentials"),
    ("https://x.example/a b", "without spaces"), ("https://x.example/" + "a" * 2100, "2048"),
    ("https://bücher.example/", "ASCII"),
])
def test_urls_refused(url: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        webhooks.check_url(url)


@pytest.mark.parametrize(("name", "ok"), [
    ("orders", True), ("team-a.prod_1", True), ("a" * 64, True), ("a" * 65, False),
    ("-x", False), ("has space", False), ("", False), ("ü", False),
])
def test_names(name: str, ok: bool) -> None:
    if ok:
        assert webhooks.check_name(name) == name
    else:
        with pytest.raises(ValueError, match="endpoint name"):
            webhooks.check_name(name)


@pytest.mark.parametrize(("lanes", "ok"), [
    ("async,interactive,webhooks", True), ("webhooks", True), ("interactive, async", True),
    ("async,async", False), ("jobs", False), ("", False),
])
def test_worker_lanes(lanes: str, ok: bool) -> None:
    if ok:
        assert Settings(lanes=lanes).worker_lanes <= {"async", "interactive", "batch", "webhooks"}
    else:
        with pytest.raises(ValidationError, match="comma-separated list"):
            Settings(lanes=lanes)


def test_every_lane_is_served_by_default() -> None:
    assert Settings.model_fields["lanes"].default == "async,interactive,batch,webhooks"


def readme_verify() -> Callable[[str, dict[str, str], bytes], bool]:
    """The verifier README.md shows receivers, run as printed."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    code = re.search(r"```python\n(# webhook-verify\n.*?)```", readme, re.S)
    assert code, "README.md lost its webhook-verify example"
    namespace: dict[str, Any] = {}
    exec(code.group(1), namespace)
    return namespace["verify"]  # type: ignore[no-any-return]


def test_the_readme_verifier_accepts_ferrys_signatures_and_nothing_else() -> None:
    verify = readme_verify()
    secret, previous = webhooks.new_secret(), webhooks.new_secret()
    headers = signed([secret, previous])
    assert verify(secret, headers, BODY) and verify(previous, headers, BODY)
    assert not verify(webhooks.new_secret(), headers, BODY)
    assert not verify(secret, headers, BODY + b" ")
    stale = webhooks.request_headers([secret], uuid.uuid4(), int(time.time()) - 600, BODY)
    assert not verify(secret, stale, BODY)
