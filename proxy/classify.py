"""Turn an upstream answer (or the lack of one) into what happened and what to do next.

Three questions per attempt: how to record it (usage outcome), what it says about the key
(health outcome), and whether another key or deployment should be tried.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum

import httpx

from keys.health import Outcome as Health
from usage.models import Outcome


class Next(StrEnum):
    DONE = "done"  # success or the client's own error: answer the client now
    NEXT_KEY = "next_key"  # this key is unusable right now; another key may work
    NEXT_DEPLOYMENT = "next_deployment"  # no key of this deployment will do better


@dataclass(frozen=True, slots=True)
class Verdict:
    outcome: str
    health: Health
    next: Next
    error_type: str = ""


SUCCESS = Verdict(Outcome.SUCCESS, Health.SUCCESS, Next.DONE)


def _error_code(body: bytes) -> str:
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return ""
    if isinstance(error, dict):
        return str(error.get("code") or error.get("type") or "")
    return ""


def classify_status(status: int, body: bytes) -> Verdict:
    if 200 <= status < 300:
        return SUCCESS
    code = _error_code(body)
    if status == 429:
        # OpenAI reports an empty balance as a 429 too; only the code tells them apart, and
        # waiting a few seconds will not refill a quota.
        if code in ("insufficient_quota", "billing_hard_limit_reached"):
            return Verdict(Outcome.QUOTA_EXHAUSTED, Health.QUOTA_EXHAUSTED, Next.NEXT_KEY, code)
        return Verdict(Outcome.RATE_LIMITED, Health.RATE_LIMITED, Next.NEXT_KEY, code or "429")
    if status == 402:
        return Verdict(
            Outcome.QUOTA_EXHAUSTED, Health.QUOTA_EXHAUSTED, Next.NEXT_KEY, code or "402"
        )
    if status in (401, 403):
        return Verdict(Outcome.AUTH_FAILED, Health.AUTH_FAILED, Next.NEXT_KEY, code or str(status))
    if status == 404:
        # The route maps to an upstream model this provider does not know: a configuration
        # problem of the deployment, not of the key or the client.
        return Verdict(
            Outcome.UPSTREAM_ERROR, Health.CLIENT_ERROR, Next.NEXT_DEPLOYMENT, code or "404"
        )
    if status == 408 or status >= 500:
        return Verdict(
            Outcome.UPSTREAM_ERROR, Health.UPSTREAM_ERROR, Next.NEXT_KEY, code or str(status)
        )
    # 400, 413, 422 and the rest: the request itself is at fault; another key would fail alike.
    return Verdict(Outcome.CLIENT_ERROR, Health.CLIENT_ERROR, Next.DONE, code or str(status))


def classify_exception(exc: Exception) -> Verdict:
    if isinstance(exc, httpx.TimeoutException):
        return Verdict(Outcome.TIMEOUT, Health.UPSTREAM_ERROR, Next.NEXT_KEY, type(exc).__name__)
    return Verdict(
        Outcome.CONNECTION_ERROR, Health.UPSTREAM_ERROR, Next.NEXT_KEY, type(exc).__name__
    )


BAD_RESPONSE = Verdict(Outcome.BAD_RESPONSE, Health.UPSTREAM_ERROR, Next.NEXT_KEY, "invalid_json")


# What says the endpoint itself is failing, for its circuit breaker. Not 4xx, 429 or 401/403
# (the key or the request), not 404 (the deployment's model), not a garbled 200 (it answered).
_ENDPOINT_FAILURES = frozenset({Outcome.UPSTREAM_ERROR, Outcome.TIMEOUT, Outcome.CONNECTION_ERROR})


def endpoint_failed(verdict: Verdict) -> bool:
    return verdict.health is Health.UPSTREAM_ERROR and verdict.outcome in _ENDPOINT_FAILURES
