"""Health changes reach the log, the Django signal and signed webhooks, with retries."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Iterator
from typing import Any
from unittest import mock

import pytest

from healthchecks.notify import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    health_change_notify,
    webhook_host,
    webhook_signature,
)
from tests.healthchecks.conftest import WebhookReceiver

SECRET = "whsec-test-0123456789"


@pytest.fixture
def eager_celery() -> Iterator[None]:
    from llmrotate_site.celery import app

    app.conf.task_always_eager = True
    yield
    app.conf.task_always_eager = False


def verify(body: bytes, signature: str, secret: str = SECRET) -> bool:
    """What a receiver does (docs/configuration.md, "Webhooks")."""
    expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, signature)


def notify(**overrides: Any) -> dict[str, Any]:
    kwargs = {
        "endpoint": "https://user:pw@api.example.test/v1?key=abc",
        "event": "breaker.open",
        "previous": "closed",
        "current": "open",
        "reason": "http probe failed 2 times in a row",
    }
    return health_change_notify(**{**kwargs, **overrides})


def test_a_change_is_posted_to_every_webhook_signed_over_the_exact_body(
    webhook_receiver: WebhookReceiver, eager_celery: None, settings
):
    settings.LLMROTATE_WEBHOOK_URLS = [webhook_receiver.url, webhook_receiver.url + "?second"]
    settings.LLMROTATE_WEBHOOK_SECRET = SECRET
    payload = notify()
    assert len(webhook_receiver.deliveries) == 2
    for delivery in webhook_receiver.deliveries:
        assert verify(delivery.body, delivery.headers[SIGNATURE_HEADER])
        assert not verify(delivery.body, delivery.headers[SIGNATURE_HEADER], secret="other")
        body = delivery.json()
        assert body == payload
        assert delivery.headers[TIMESTAMP_HEADER] == str(body["timestamp"])
        assert delivery.headers["Content-Type"] == "application/json"
    assert payload["endpoint"] == "https://***@api.example.test/v1?key=***"  # masked
    assert {k for k in payload} == {
        "id", "event", "endpoint", "previous", "current", "reason", "timestamp", "occurred_at",
    }  # fmt: skip


def test_a_failed_delivery_is_retried_and_the_retry_carries_the_same_body(
    webhook_receiver: WebhookReceiver, eager_celery: None, settings
):
    settings.LLMROTATE_WEBHOOK_URLS = [webhook_receiver.url]
    webhook_receiver.fail_next = 2
    payload = notify()
    assert webhook_receiver.attempts == 3
    [delivery] = webhook_receiver.deliveries
    assert delivery.json()["id"] == payload["id"]


def test_delivery_gives_up_after_the_configured_retries(
    webhook_receiver: WebhookReceiver, eager_celery: None, settings, caplog
):
    settings.LLMROTATE_WEBHOOK_URLS = [webhook_receiver.url]
    settings.LLMROTATE_WEBHOOK_RETRIES = 2
    webhook_receiver.fail_next = 10
    with caplog.at_level(logging.ERROR, logger="llmrotate.health"):
        notify()
    assert webhook_receiver.attempts == 3 and webhook_receiver.deliveries == []
    assert "failed for good" in caplog.text


def test_without_webhooks_nothing_is_queued_but_the_change_is_logged_and_signalled(
    settings, caplog
):
    from healthchecks.signals import endpoint_health_changed

    settings.LLMROTATE_WEBHOOK_URLS = []
    received: list[dict[str, Any]] = []

    def receiver(sender: Any, payload: dict[str, Any], **kwargs: Any) -> None:
        received.append(payload)

    endpoint_health_changed.connect(receiver)
    try:
        with (
            mock.patch("healthchecks.tasks.webhook_deliver.delay") as delay,
            caplog.at_level(logging.WARNING, logger="llmrotate.health"),
        ):
            notify(event="endpoint.down", previous="up", current="down")
    finally:
        endpoint_health_changed.disconnect(receiver)
    delay.assert_not_called()
    assert [p["event"] for p in received] == ["endpoint.down"]
    assert "endpoint.down" in caplog.text and "pw" not in caplog.text


def test_a_broker_outage_does_not_break_the_caller(settings, caplog):
    settings.LLMROTATE_WEBHOOK_URLS = ["http://127.0.0.1:9/hook"]
    with mock.patch("healthchecks.tasks.webhook_deliver.delay", side_effect=OSError("down")):
        notify()
    assert "could not queue the webhook" in caplog.text


def test_webhook_urls_are_logged_by_host_only():
    slack = "https://hooks.slack.com/services/T0000/B0000/s3cretPathToken"
    assert webhook_host(slack) == "hooks.slack.com"
    assert webhook_host("https://u:p@hooks.example:8443/x?token=s3cret") == "hooks.example:8443"


def test_the_signature_is_hmac_sha256_of_the_body():
    body = json.dumps({"a": 1}).encode()
    assert webhook_signature(secret=SECRET, body=body) == (
        "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    )


def test_a_budget_reaching_a_share_is_posted_signed_once_per_window(
    webhook_receiver: WebhookReceiver, eager_celery: None, settings
):
    from decimal import Decimal

    from keys.limits import Estimate, LimitSpec, MemoryLimiter, budget_check, spec_meters

    settings.LLMROTATE_WEBHOOK_URLS = [webhook_receiver.url]
    settings.LLMROTATE_WEBHOOK_SECRET = SECRET
    settings.LLMROTATE_BUDGET_ALERT_PERCENTS = [50, 80, 100]
    limiter = MemoryLimiter()
    spec = LimitSpec(id=1, client="ci", usd_per_day=Decimal(2))
    # A window in the far future: "once per window" holds only while the window is open by the
    # real clock, which a fixed date in the past would have closed.
    [meter] = spec_meters(spec, Estimate(), now=4_102_444_800.0, zone="UTC")
    budget_check(limiter, meter, 1_700_000)  # $1.70 of $2: 50% and 80%
    budget_check(limiter, meter, 1_800_000)  # nothing new in this window
    bodies = [json.loads(d.body) for d in webhook_receiver.deliveries]
    assert [(b["event"], b["percent"]) for b in bodies] == [
        ("budget.threshold", 50),
        ("budget.threshold", 80),
    ]
    assert (bodies[0]["budget"], bodies[0]["period"]) == ("client 'ci'", "day")
    assert (bodies[1]["budget_usd"], bodies[1]["spent_usd"]) == (2.0, 1.7)
    assert bodies[0]["resets_at"] == "2100-01-02T00:00:00+00:00"
    for delivery in webhook_receiver.deliveries:
        assert verify(delivery.body, delivery.headers[SIGNATURE_HEADER])
