"""Limits on the request path: admit a request against its client's and route's limits (or
refuse it with a 429 in the caller's dialect), admit each attempt against its upstream key's
limits, and the `x-ratelimit-*` headers of the answer. keys.limits has the algorithm and the
stores; the recorder settles what was reserved (keys.limits.Reservation) from each record.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from decimal import Decimal
from functools import partial

from django.conf import settings

from common import metrics
from common.background import spawn
from common.db import run_outside_request
from common.errors import ApiError
from keys.limits import (
    MINUTE,
    REQUESTS,
    TOKENS,
    USD,
    USD_UNITS,
    Decision,
    Estimate,
    Lease,
    LimitSpec,
    Meter,
    Reservation,
    budget_check,
    get_limiter,
    key_meters,
    spec_lease,
    spec_meters,
)
from keys.routing import DeploymentInfo, RouteInfo, RoutingSnapshot, UpstreamKey
from usage.pricing import call_cost

logger = logging.getLogger("llmrotate.limits")

# A concurrency slot outlives its request's deadline by this much before it lapses on its own
# (a process that died holding it); normally the request's end gives it back at once.
_LEASE_MARGIN_SECONDS = 60.0
# A rough count of a prompt's tokens from its size, for the reservation only (settled from the
# reported usage): about four bytes of JSON per token, rounded up.
_BYTES_PER_TOKEN = 4
# Prices of (provider, model) for reservations, read off the event loop and kept this long.
_PRICE_TTL_SECONDS = 300.0
_prices: dict[tuple[str, str, str], tuple[float, Decimal, Decimal]] = {}
_PRICES_MAX = 1024


def applicable(snapshot: RoutingSnapshot, client: str, route: str) -> list[LimitSpec]:
    """The client's, the route's and the pair's limits, those that exist."""
    limits = snapshot.limits
    if not limits:
        return []
    found = (limits.get((client, "")), limits.get(("", route)), limits.get((client, route)))
    return [spec for spec in found if spec is not None]


def estimate_tokens(body_bytes: int, max_output: int | None) -> int:
    return math.ceil(body_bytes / _BYTES_PER_TOKEN) + (
        max_output or settings.LLMROTATE_LIMITS_DEFAULT_MAX_TOKENS
    )


async def admit(
    *,
    specs: list[LimitSpec],
    route: RouteInfo,
    deployments: Iterable[DeploymentInfo],
    request_id: str,
    body_bytes: int,
    max_output: int | None,
) -> Reservation | None:
    """Reserve the request against `specs` (all or nothing). Returns the reservation to settle,
    or None when nothing was reserved (fail open); raises the 429 (or, failing closed, 503)."""
    now = time.time()
    tokens = estimate_tokens(body_bytes, max_output)
    usd = 0
    if any(spec.has_budget for spec in specs):
        usd = await _usd_estimate(deployments, body_bytes, max_output)
    estimate = Estimate(tokens=tokens, usd=usd)
    zone = settings.LLMROTATE_LIMITS_TIME_ZONE
    meters: list[Meter] = []
    leases: list[Lease] = []
    for spec in specs:
        meters += spec_meters(spec, estimate, now=now, zone=zone)
        if (lease := spec_lease(spec)) is not None:
            leases.append(lease)
    limiter = get_limiter()
    lease_until = now + settings.LLMROTATE_REQUEST_DEADLINE_SECONDS + _LEASE_MARGIN_SECONDS
    decision = await limiter.reserve(meters, leases, lease_id=request_id, lease_until=lease_until)
    if decision.error:
        if settings.LLMROTATE_LIMITS_FAIL_OPEN:
            return None
        raise ApiError(
            503,
            "The gateway cannot check this request's limits right now (its Redis is"
            " unavailable), and is set to refuse requests then (LLMROTATE_LIMITS_FAIL_OPEN).",
            type="service_unavailable",
            code="limits_unavailable",
            retry_after=2,
        )
    if not decision.allowed:
        raise _refusal(decision, route=route.config_name, now=now)
    return Reservation(
        decision=decision,
        lease_keys=tuple(lease.key for lease in leases),
        lease_id=request_id,
    )


async def key_admit(key: UpstreamKey, *, tokens: int, lease_id: str) -> Reservation | None:
    """Reserve one attempt against its upstream key's own limits (the provider's). None when
    the key has none, or the limiter is away (the provider's own 429 still protects the key);
    a reservation whose decision is not `allowed` when the key has no headroom left."""
    if key.rpm is None and key.tpm is None:
        return None
    meters = key_meters(key.key_id, rpm=key.rpm, tpm=key.tpm, tokens=tokens, now=time.time())
    decision = await get_limiter().reserve(meters, (), lease_id=lease_id, lease_until=0.0)
    if decision.error:
        return None
    return Reservation(decision=decision)


def rate_limit_headers(decision: Decision, *, now: float) -> dict[str, str]:
    """OpenAI's `x-ratelimit-*` headers for the tightest request limit and the tightest token
    limit (the one with the least left), as the OpenAI SDKs read them."""
    headers: dict[str, str] = {}
    for kind, suffix in ((REQUESTS, "requests"), (TOKENS, "tokens")):
        tightest: tuple[int, Meter] | None = None
        for meter, used in zip(decision.meters, decision.used, strict=True):
            if meter.kind != kind:
                continue
            left = max(0, meter.limit - used)
            if tightest is None or left < tightest[0]:
                tightest = (left, meter)
        if tightest is not None:
            left, meter = tightest
            headers[f"x-ratelimit-limit-{suffix}"] = str(meter.limit)
            headers[f"x-ratelimit-remaining-{suffix}"] = str(left)
            headers[f"x-ratelimit-reset-{suffix}"] = duration(meter.resets_at - now)
    return headers


def duration(seconds: float) -> str:
    """A wait as OpenAI writes it in `x-ratelimit-reset-*`: 20ms, 1.5s, 6m0s, 2h3m4s."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    whole = math.ceil(seconds * 10) / 10
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{secs:.1f}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{int(hours)}h{int(minutes)}m{text}"
    return f"{int(minutes)}m{text}" if minutes else text


def _refusal(decision: Decision, *, route: str, now: float) -> ApiError:
    """The 429 for a refused request: OpenAI's shape (type `requests` or `tokens`, code
    `rate_limit_exceeded`), `rate_limit_error` in Anthropic's envelope; a spent budget and a
    request larger than a limit have codes of their own and say not to retry."""
    blocked = decision.blocked
    retry_after = decision.retry_after(now)
    headers = rate_limit_headers(decision, now=now)
    headers["retry-after-ms"] = str(math.ceil(retry_after * 1000))
    if isinstance(blocked, Lease):
        metrics.LIMITED.inc(route, "concurrency", "none")
        kind, code = REQUESTS, "concurrency_limit_exceeded"
        message = (
            f"Concurrency limit reached for {blocked.label}: {blocked.limit} request(s) in"
            " flight at most. Try again when one of them has finished."
        )
    else:
        assert isinstance(blocked, Meter)
        metrics.LIMITED.inc(route, blocked.kind, blocked.period)
        kind = blocked.kind
        used = decision.used[decision.meters.index(blocked)]
        limit, amount = _amount(blocked, blocked.limit), _amount(blocked, blocked.amount)
        if blocked.amount > blocked.limit:
            # This request alone is more than the limit: waiting will not help.
            code = "request_exceeds_limit"
            message = (
                f"Request too large for {blocked.label}: it reserves {amount} but the limit is"
                f" {limit} per {blocked.period}."
            )
            if kind == TOKENS:
                message += " Lower max_tokens, or send a shorter prompt."
        elif kind == USD:
            kind, code = "insufficient_quota", "budget_exceeded"
            _budget_refused(blocked, used)
            resets = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(blocked.resets_at))
            message = (
                f"The budget of {blocked.label} is spent for this {blocked.period}: budget"
                f" {limit}, used {_amount(blocked, used)}, this request reserves {amount}."
                f" It resets at {resets}."
            )
        else:
            code = "rate_limit_exceeded"
            per = "min" if blocked.period == MINUTE else blocked.period
            message = (
                f"Rate limit reached for {blocked.label} on {kind} per {per}: limit"
                f" {blocked.limit}, used {used}, requested {blocked.amount}. Please try again"
                f" in {duration(retry_after)}."
            )
        if code != "rate_limit_exceeded":
            headers["x-should-retry"] = "false"  # not a blip that a retry gets through
    error = ApiError(429, message, type=kind, code=code, retry_after=retry_after)
    return error.with_anthropic_type("rate_limit_error").with_headers(headers)


def _budget_refused(meter: Meter, used: int) -> None:
    """The 100% alert, even if the recorded spend stops short of it (its last cents are less
    than a request reserves). In the database thread: the limiter's sync calls may block."""
    limiter = get_limiter()
    spawn(run_outside_request(partial(budget_check, limiter, meter, used, refused=True)))


def _amount(meter: Meter, value: int) -> str:
    if meter.kind == USD:
        return f"${value / USD_UNITS:.4f}"
    return f"{value} {meter.kind}"


async def _usd_estimate(
    deployments: Iterable[DeploymentInfo], body_bytes: int, max_output: int | None
) -> int:
    """The most the request may cost on the first deployment that can serve it, in
    micro-dollars: its prompt estimate at the input price, its output limit at the output price.
    0 when the model has no known price (its calls then cost nothing in the records either)."""
    for deployment in deployments:
        if not deployment.keys:
            continue
        provider = deployment.provider
        rates = await _rates(provider.name, provider.kind, deployment.model)
        if rates is None:
            return 0
        input_rate, output_rate = rates
        prompt = math.ceil(body_bytes / _BYTES_PER_TOKEN)
        output = max_output or settings.LLMROTATE_LIMITS_DEFAULT_MAX_TOKENS
        return math.ceil((prompt * input_rate + output * output_rate) * USD_UNITS)
    return 0


async def _rates(provider: str, kind: str, model: str) -> tuple[Decimal, Decimal] | None:
    """USD per token, input and output, from the same price list the records use (read in
    the gateway's database thread: the override table is in the database)."""
    key = (provider, kind, model)
    cached = _prices.get(key)
    if cached is not None and time.monotonic() < cached[0]:
        return (cached[1], cached[2]) if cached[1] >= 0 else None

    def read() -> tuple[Decimal, Decimal] | None:
        million = 1_000_000
        per_input = call_cost(
            provider=provider,
            provider_kind=kind,
            model=model,
            prompt_tokens=million,
            completion_tokens=0,
            cached_tokens=0,
        )
        per_output = call_cost(
            provider=provider,
            provider_kind=kind,
            model=model,
            prompt_tokens=0,
            completion_tokens=million,
            cached_tokens=0,
        )
        if per_input is None or per_output is None:
            return None
        return Decimal(per_input) / million, Decimal(per_output) / million

    try:
        rates = await run_outside_request(read)
    except Exception:
        logger.warning("prices unavailable for a budget reservation of %s", model, exc_info=True)
        rates = None
    if len(_prices) >= _PRICES_MAX:
        # A pattern route prices whatever model names its clients send: kept bounded.
        _prices.clear()
    _prices[key] = (
        time.monotonic() + _PRICE_TTL_SECONDS,
        *(rates or (Decimal(-1), Decimal(-1))),
    )
    return rates
