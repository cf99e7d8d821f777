"""Turn an upstream answer (or the lack of one) into what happened and what to do next.

Three questions per attempt: how to record it (usage outcome), what it says about the key
(health outcome), and whether another key or deployment should be tried.

Anthropic's answers fall in the same status classes (429 rate_limit_error, 529
overloaded_error, 401/403, 404 not_found_error for a model); only an empty credit balance
and a disabled organization, both a 400, need the message read, and only from an Anthropic
provider.
"""

from __future__ import annotations

import json
import re
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


# An upstream's error code ends up in the record, the key's state, logs and the client's 502
# message; whatever the upstream sends, it is cut to this (the record column's width).
MAX_ERROR_CODE = 64
_UNPRINTABLE = re.compile(r"[^\x21-\x7e]+")


def clip_code(code: str) -> str:
    """An upstream-supplied code or name (an error code, a tool's name) fit to keep and show:
    printable ASCII, bounded."""
    return _UNPRINTABLE.sub("_", code[: MAX_ERROR_CODE * 4])[:MAX_ERROR_CODE]


def _error(body: bytes) -> tuple[str, str]:
    """(code, message) of an OpenAI `{"error": {code, type, message}}` or Anthropic
    `{"type": "error", "error": {type, message}}` body; the code falls back to the type."""
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError, RecursionError):
        return "", ""
    if isinstance(error, dict):
        message = error.get("message")
        code = clip_code(str(error.get("code") or error.get("type") or ""))
        return code, message if isinstance(message, str) else ""
    return "", ""


# Anthropic answers an empty credit balance and a disabled organization with a plain 400
# invalid_request_error; only the message tells them from a bad request. Matched whole and
# only from an Anthropic provider: a 400 often repeats the client's own field names ("<field>:
# Extra inputs are not permitted"), so a substring match would let any client quarantine or
# exhaust every key by naming a field after one of these messages.
_ANTHROPIC_EXHAUSTED = frozenset(
    {
        "Your credit balance is too low to access the Anthropic API. "
        "Please go to Plans & Billing to upgrade or purchase credits.",
    }
)
_ANTHROPIC_DISABLED = frozenset({"This organization has been disabled."})


def classify_status(status: int, body: bytes, *, kind: str = "openai") -> Verdict:
    """`kind` is the provider's (openai | anthropic | openai_compatible)."""
    if 200 <= status < 300:
        return SUCCESS
    code, message = _error(body)
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
    if code == "billing_error":
        return Verdict(Outcome.QUOTA_EXHAUSTED, Health.QUOTA_EXHAUSTED, Next.NEXT_KEY, code)
    if kind == "anthropic" and message.strip() in _ANTHROPIC_DISABLED:
        # The key's account is unusable until someone acts: quarantine, then a re-check.
        return Verdict(Outcome.AUTH_FAILED, Health.AUTH_FAILED, Next.NEXT_KEY, "account_disabled")
    if kind == "anthropic" and message.strip() in _ANTHROPIC_EXHAUSTED:
        return Verdict(
            Outcome.QUOTA_EXHAUSTED, Health.QUOTA_EXHAUSTED, Next.NEXT_KEY, "credit_balance_too_low"
        )
    # 400, 413, 422 and the rest: the request itself is at fault; another key would fail alike.
    return Verdict(Outcome.CLIENT_ERROR, Health.CLIENT_ERROR, Next.DONE, code or str(status))


def classify_exception(exc: Exception) -> Verdict:
    if isinstance(exc, httpx.PoolTimeout):
        # Our own connection pool for this upstream is full: nothing was sent, so neither the
        # key nor the endpoint is at fault. Another deployment has a pool of its own.
        return Verdict(Outcome.TIMEOUT, Health.CLIENT_ERROR, Next.NEXT_DEPLOYMENT, "pool_full")
    if isinstance(exc, httpx.TimeoutException):
        return Verdict(Outcome.TIMEOUT, Health.UPSTREAM_ERROR, Next.NEXT_KEY, type(exc).__name__)
    return Verdict(
        Outcome.CONNECTION_ERROR, Health.UPSTREAM_ERROR, Next.NEXT_KEY, type(exc).__name__
    )


BAD_RESPONSE = Verdict(Outcome.BAD_RESPONSE, Health.UPSTREAM_ERROR, Next.NEXT_KEY, "invalid_json")
# The request's deadline ran out while the upstream was still sending its head or body: one
# that trickles bytes never stays silent for the read timeout, so only the deadline ends it.
DEADLINE_PASSED = Verdict(Outcome.TIMEOUT, Health.UPSTREAM_ERROR, Next.NEXT_KEY, "deadline")
# The client hung up (its request was cancelled) while the attempt was in flight. Says nothing
# about the key or its endpoint.
CLIENT_GONE = Verdict(
    Outcome.CLIENT_DISCONNECTED, Health.CLIENT_ERROR, Next.DONE, "client_disconnected"
)
# The upstream's answer was larger than LLMROTATE_MAX_RESPONSE_BYTES: not read further. Not the
# key's fault, and another key of the same deployment would send the same.
RESPONSE_TOO_LARGE = Verdict(
    Outcome.BAD_RESPONSE, Health.CLIENT_ERROR, Next.NEXT_DEPLOYMENT, "response_too_large"
)
# A stream's first event was larger than LLMROTATE_MAX_SSE_EVENT_BYTES (before anything reached
# the client); the same bounds as RESPONSE_TOO_LARGE.
EVENT_TOO_LARGE = Verdict(
    Outcome.BAD_RESPONSE, Health.CLIENT_ERROR, Next.NEXT_DEPLOYMENT, "event_too_large"
)
# Something in the gateway itself raised while the attempt held its key (a bug): recorded, the
# key given back untouched, and the client answered 500.
GATEWAY_FAILED = Verdict(Outcome.GATEWAY_ERROR, Health.CLIENT_ERROR, Next.DONE, "gateway_error")
# A 200 event stream that ended before its first byte: nothing reached the client, so another
# key may answer instead.
EMPTY_STREAM = Verdict(Outcome.BAD_RESPONSE, Health.UPSTREAM_ERROR, Next.NEXT_KEY, "empty_stream")
# A 200 stream whose first event is an error (Anthropic's overloaded_error, an OpenAI-compatible
# server's {"error": …}): nothing has been generated, so another key may answer.
ERROR_FIRST = Verdict(
    Outcome.UPSTREAM_ERROR, Health.UPSTREAM_ERROR, Next.NEXT_KEY, "upstream_error_event"
)


# What says the endpoint itself is failing, for its circuit breaker. Not 4xx, 429 or 401/403
# (the key or the request), not 404 (the deployment's model), not a garbled 200 (it answered).
_ENDPOINT_FAILURES = frozenset({Outcome.UPSTREAM_ERROR, Outcome.TIMEOUT, Outcome.CONNECTION_ERROR})


def endpoint_failed(verdict: Verdict) -> bool:
    return verdict.health is Health.UPSTREAM_ERROR and verdict.outcome in _ENDPOINT_FAILURES
