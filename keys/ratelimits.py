"""Read what an upstream says about its rate limits: headroom and when to come back.

Pure functions over response headers. Providers disagree on the format (OpenAI sends Go-style
durations such as "6m0s", Anthropic sends RFC 3339 timestamps, plain HTTP sends `Retry-After`
as seconds or an HTTP-date), and some proxies in between send garbage. A header we cannot read
is ignored, never an exception: a bad header must not turn a usable response into a 500.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any

# OpenAI: x-ratelimit-{limit,remaining,reset}-{requests,tokens}
_OPENAI = "x-ratelimit-"
# Anthropic: anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-{limit,remaining,
# reset}
_ANTHROPIC = "anthropic-ratelimit-"

_GO_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass(frozen=True)
class Headroom:
    """What the upstream said is left, as of the response that carried these headers."""

    remaining_requests: int | None = None
    remaining_tokens: int | None = None
    limit_requests: int | None = None
    limit_tokens: int | None = None
    reset_requests_s: float | None = None
    reset_tokens_s: float | None = None

    @property
    def depleted(self) -> bool:
        return self.remaining_requests == 0 or self.remaining_tokens == 0


def parse_headroom(
    headers: Mapping[str, str] | Any, *, now: float | None = None
) -> Headroom | None:
    """Headroom from OpenAI or Anthropic rate-limit headers; None when neither is present.

    `now` only matters for Anthropic, whose resets are absolute timestamps.
    """
    h = _lower(headers)
    if any(name.startswith(_OPENAI) for name in h):
        return Headroom(
            remaining_requests=_int(h.get(_OPENAI + "remaining-requests")),
            remaining_tokens=_int(h.get(_OPENAI + "remaining-tokens")),
            limit_requests=_int(h.get(_OPENAI + "limit-requests")),
            limit_tokens=_int(h.get(_OPENAI + "limit-tokens")),
            reset_requests_s=parse_duration(h.get(_OPENAI + "reset-requests")),
            reset_tokens_s=parse_duration(h.get(_OPENAI + "reset-tokens")),
        )
    if any(name.startswith(_ANTHROPIC) for name in h):
        now = _now(now)
        # Anthropic may report input and output token budgets separately; the tighter one is
        # what will stop the next call.
        token_dims = ("tokens", "input-tokens", "output-tokens")
        remaining_tokens, limit_tokens = _tightest(
            (_int(h.get(f"{_ANTHROPIC}{d}-remaining")), _int(h.get(f"{_ANTHROPIC}{d}-limit")))
            for d in token_dims
        )
        return Headroom(
            remaining_requests=_int(h.get(_ANTHROPIC + "requests-remaining")),
            remaining_tokens=remaining_tokens,
            limit_requests=_int(h.get(_ANTHROPIC + "requests-limit")),
            limit_tokens=limit_tokens,
            reset_requests_s=_until(h.get(_ANTHROPIC + "requests-reset"), now=now),
            reset_tokens_s=_max(
                _until(h.get(f"{_ANTHROPIC}{d}-reset"), now=now) for d in token_dims
            ),
        )
    return None


def _tightest(budgets: Iterable[tuple[int | None, int | None]]) -> tuple[int | None, int | None]:
    """(remaining, limit) of the budget with the smallest fraction left, the two kept from the
    same budget: 20k of 400k input tokens is tighter than 79k of 80k output tokens. Budgets
    without a limit count only when none has one (then the smallest remaining)."""
    known = [(r, limit) for r, limit in budgets if r is not None]
    limited = [(r, limit) for r, limit in known if limit]
    if limited:
        return min(limited, key=lambda b: b[0] / b[1])
    return _min(r for r, _ in known), None


def parse_retry_after(headers: Mapping[str, str] | Any, *, now: float) -> float | None:
    """Seconds from `now` until the upstream wants to hear from us again, or None if unsaid.

    Explicit retry headers win over rate-limit resets: they are the server's answer for this
    very response, whereas resets describe a window that may refill sooner than needed.
    """
    h = _lower(headers)
    ms = _float(h.get("retry-after-ms"))
    if ms is not None and ms >= 0:
        return ms / 1000.0
    raw = h.get("retry-after")
    if raw is not None:
        seconds = _float(raw)
        if seconds is not None and seconds >= 0:
            return seconds
        when = _http_date(raw)
        if when is not None:
            return max(0.0, when - now)
    headroom = parse_headroom(h, now=now)
    if headroom is None:
        return None
    return _reset_for(headroom)


def parse_duration(value: str | None) -> float | None:
    """Seconds in a Go-style duration ("1s", "6m0s", "20ms", "1h2m3.5s") or a bare number."""
    if value is None:
        return None
    text = value.strip()
    plain = _float(text)
    if plain is not None:
        return plain if plain >= 0 else None
    if not text or _GO_DURATION_PART.sub("", text) != "":
        return None
    total = sum(float(num) * _GO_UNITS[unit] for num, unit in _GO_DURATION_PART.findall(text))
    return total if math.isfinite(total) else None


def _reset_for(headroom: Headroom) -> float | None:
    # The dimension that is at zero is the one blocking us; if none is (or we cannot tell),
    # waiting for the later reset is the safe answer.
    blocked = []
    if headroom.remaining_requests == 0 and headroom.reset_requests_s is not None:
        blocked.append(headroom.reset_requests_s)
    if headroom.remaining_tokens == 0 and headroom.reset_tokens_s is not None:
        blocked.append(headroom.reset_tokens_s)
    if blocked:
        return max(blocked)
    return _max([headroom.reset_requests_s, headroom.reset_tokens_s])


def _lower(headers: Mapping[str, str] | Any) -> dict[str, str]:
    # httpx.Headers, a plain dict or Django's request.headers: all offer items().
    try:
        items = headers.items()
    except AttributeError:
        return {}
    out: dict[str, str] = {}
    for name, value in items:
        if isinstance(name, bytes):
            name = name.decode("latin-1")
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        if isinstance(name, str) and isinstance(value, str):
            out[name.lower()] = value
    return out


def _now(now: float | None) -> float:
    return time.time() if now is None else now


def _float(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        result = float(value.strip())
    except ValueError:
        return None
    return result if math.isfinite(result) else None


def _int(value: str | None) -> int | None:
    number = _float(value)
    if number is None or number < 0:
        return None
    return int(number)


def _http_date(value: str) -> float | None:
    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _until(value: str | None, *, now: float) -> float | None:
    """Seconds from `now` to an RFC 3339 timestamp (clamped at 0)."""
    if value is None:
        return None
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return None
    if when.tzinfo is None:  # a timestamp without a zone is meaningless here; don't guess
        return None
    return max(0.0, when.timestamp() - now)


def _min(values: Iterable[int | None]) -> int | None:
    present = [v for v in values if v is not None]
    return min(present) if present else None


def _max(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None
