"""Anthropic's error bodies (`{"type": "error", "error": {"type", "message"}}`) classified: the
same statuses mean the same thing, and an empty credit balance (a 400) is told apart."""

from __future__ import annotations

import json

import pytest

from keys.health import Outcome as Health
from proxy.classify import Next, classify_status

CREDIT = (
    "Your credit balance is too low to access the Anthropic API. "
    "Please go to Plans & Billing to upgrade or purchase credits."
)


def body(etype: str, message: str = "m") -> bytes:
    return json.dumps({"type": "error", "error": {"type": etype, "message": message}}).encode()


@pytest.mark.parametrize(
    ("status", "payload", "outcome", "health", "next_step", "error_type"),
    [
        (
            429,
            body("rate_limit_error"),
            "rate_limited",
            Health.RATE_LIMITED,
            Next.NEXT_KEY,
            "rate_limit_error",
        ),
        (
            529,
            body("overloaded_error"),
            "upstream_error",
            Health.UPSTREAM_ERROR,
            Next.NEXT_KEY,
            "overloaded_error",
        ),
        (
            401,
            body("authentication_error"),
            "auth_failed",
            Health.AUTH_FAILED,
            Next.NEXT_KEY,
            "authentication_error",
        ),
        (
            403,
            body("permission_error"),
            "auth_failed",
            Health.AUTH_FAILED,
            Next.NEXT_KEY,
            "permission_error",
        ),
        (
            404,
            body("not_found_error", "model: claude-9"),
            "upstream_error",
            Health.CLIENT_ERROR,
            Next.NEXT_DEPLOYMENT,
            "not_found_error",
        ),
        (
            400,
            body("invalid_request_error", CREDIT),
            "quota_exhausted",
            Health.QUOTA_EXHAUSTED,
            Next.NEXT_KEY,
            "credit_balance_too_low",
        ),
        (
            400,
            body("invalid_request_error", "This organization has been disabled."),
            "auth_failed",
            Health.AUTH_FAILED,
            Next.NEXT_KEY,
            "account_disabled",
        ),
        (
            402,
            body("billing_error"),
            "quota_exhausted",
            Health.QUOTA_EXHAUSTED,
            Next.NEXT_KEY,
            "billing_error",
        ),
        (
            400,
            body("invalid_request_error", "max_tokens: Field required"),
            "client_error",
            Health.CLIENT_ERROR,
            Next.DONE,
            "invalid_request_error",
        ),
        (
            413,
            body("request_too_large"),
            "client_error",
            Health.CLIENT_ERROR,
            Next.DONE,
            "request_too_large",
        ),
    ],
)
def test_it_classifies_anthropic_answers(status, payload, outcome, health, next_step, error_type):
    verdict = classify_status(status, payload, kind="anthropic")
    assert (verdict.outcome, verdict.health, verdict.next, verdict.error_type) == (
        outcome,
        health,
        next_step,
        error_type,
    )


@pytest.mark.parametrize(
    "message",
    [
        f"{CREDIT}: Extra inputs are not permitted",
        "This organization has been disabled.: Extra inputs are not permitted",
        "Unrecognized request argument supplied: This organization has been disabled.",
    ],
)
def test_a_client_cannot_penalise_keys_by_naming_a_field_after_an_account_error(message):
    # Upstreams repeat the client's field names in a 400; such an echo is the client's fault.
    verdict = classify_status(400, body("invalid_request_error", message), kind="anthropic")
    assert (verdict.outcome, verdict.health, verdict.next) == (
        "client_error",
        Health.CLIENT_ERROR,
        Next.DONE,
    )


@pytest.mark.parametrize("message", [CREDIT, "This organization has been disabled."])
def test_account_messages_count_only_from_an_anthropic_provider(message):
    verdict = classify_status(400, body("invalid_request_error", message), kind="openai")
    assert verdict.next is Next.DONE
