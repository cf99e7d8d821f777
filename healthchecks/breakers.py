"""What the proxy's gate (healthchecks.gate) and the probes (healthchecks.services) share about
circuit breakers: the policy from the settings, and announcing the steps of a transition."""

from __future__ import annotations

import itertools

from django.conf import settings

from healthchecks import breaker
from healthchecks.breaker import BreakerPolicy, BreakerState, BreakerStatus
from healthchecks.notify import health_change_notify


def breaker_policy() -> BreakerPolicy:
    return BreakerPolicy(
        open_seconds=settings.LLMROTATE_BREAKER_OPEN_SECONDS,
        max_open_seconds=settings.LLMROTATE_BREAKER_MAX_OPEN_SECONDS,
        window_seconds=settings.LLMROTATE_BREAKER_WINDOW_SECONDS,
        min_calls=settings.LLMROTATE_BREAKER_MIN_CALLS,
        failure_rate=settings.LLMROTATE_BREAKER_FAILURE_RATE,
    )


def breaker_announce(
    *, endpoint: str, before: BreakerState, after: BreakerState, now: float
) -> None:
    """Notify each status a transition passed through (the proxy calls this off the request
    path, after `get_breaker_store().update`: see healthchecks.gate)."""
    steps = breaker.transitions(before, after, now=now)
    lapsed = breaker.effective(before, now=now)
    for previous, current in itertools.pairwise(steps):
        if current == BreakerStatus.HALF_OPEN and before.status == BreakerStatus.OPEN:
            # Half-open happened when the open period ran out, not when someone noticed: so
            # dated, the notifications sort in the order things happened.
            reason, at = "the open period is over", min(now, lapsed.changed_at)
        else:
            reason, at = after.reason, now
        health_change_notify(
            endpoint=endpoint,
            event=f"breaker.{current}",
            previous=previous,
            current=current,
            reason=reason,
            now=at,
        )
