"""Error classification: what each upstream answer means for the record, the key and failover."""

from __future__ import annotations

import json

import httpx
import pytest

from keys.health import Outcome as Health
from proxy.classify import Next, classify_exception, classify_status, endpoint_failed


def body(code: str) -> bytes:
    return json.dumps({"error": {"message": "m", "type": "t", "code": code}}).encode()


@pytest.mark.parametrize(
    ("status", "payload", "outcome", "health", "next_step"),
    [
        (200, b"{}", "success", Health.SUCCESS, Next.DONE),
        (429, body("rate_limit_exceeded"), "rate_limited", Health.RATE_LIMITED, Next.NEXT_KEY),
        (429, body("insufficient_quota"), "quota_exhausted", Health.QUOTA_EXHAUSTED, Next.NEXT_KEY),
        (402, b"", "quota_exhausted", Health.QUOTA_EXHAUSTED, Next.NEXT_KEY),
        (401, body("invalid_api_key"), "auth_failed", Health.AUTH_FAILED, Next.NEXT_KEY),
        (403, b"forbidden", "auth_failed", Health.AUTH_FAILED, Next.NEXT_KEY),
        (404, body("model_not_found"), "upstream_error", Health.CLIENT_ERROR, Next.NEXT_DEPLOYMENT),
        (500, b"<html>", "upstream_error", Health.UPSTREAM_ERROR, Next.NEXT_KEY),
        (503, b"", "upstream_error", Health.UPSTREAM_ERROR, Next.NEXT_KEY),
        (408, b"", "upstream_error", Health.UPSTREAM_ERROR, Next.NEXT_KEY),
        (400, body("context_length_exceeded"), "client_error", Health.CLIENT_ERROR, Next.DONE),
        (413, b"", "client_error", Health.CLIENT_ERROR, Next.DONE),
        (422, b"", "client_error", Health.CLIENT_ERROR, Next.DONE),
    ],
)
def test_it_classifies_upstream_statuses(status, payload, outcome, health, next_step):
    verdict = classify_status(status, payload)
    assert (verdict.outcome, verdict.health, verdict.next) == (outcome, health, next_step)


def test_it_keeps_the_upstream_error_code_as_the_error_type():
    assert classify_status(400, body("context_length_exceeded")).error_type == (
        "context_length_exceeded"
    )


@pytest.mark.parametrize(
    ("exc", "outcome"),
    [
        (httpx.ConnectTimeout("t"), "timeout"),
        (httpx.ReadTimeout("t"), "timeout"),
        (httpx.ConnectError("refused"), "connection_error"),
        (httpx.RemoteProtocolError("reset"), "connection_error"),
        (httpx.ReadError("reset"), "connection_error"),
    ],
)
def test_transport_failures_fail_over_and_count_against_the_key(exc, outcome):
    verdict = classify_exception(exc)
    assert verdict.outcome == outcome
    assert verdict.health is Health.UPSTREAM_ERROR
    assert verdict.next is Next.NEXT_KEY


def test_a_full_connection_pool_is_not_held_against_the_key_or_the_endpoint():
    verdict = classify_exception(httpx.PoolTimeout("pool full"))
    assert (verdict.health, verdict.next, verdict.error_type) == (
        Health.CLIENT_ERROR,
        Next.NEXT_DEPLOYMENT,
        "pool_full",
    )
    assert not endpoint_failed(verdict)
