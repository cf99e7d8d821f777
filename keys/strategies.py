"""Rotation strategies: in which order to try a route's keys. Pure: state and counters come in.

Every strategy first drops keys that are not available right now, so the proxy can simply walk
the returned list, acquiring each key in turn until one is granted.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from itertools import groupby
from typing import Any

from keys.health import KeyState, KeyStatus, effective_state, returns_at

STRATEGIES: tuple[tuple[str, str], ...] = (
    ("health_aware", "Health-aware (headroom, then priority, then weight)"),
    ("round_robin", "Round robin"),
    ("priority", "Priority order (failover only)"),
    ("weighted", "Weighted random"),
    ("least_busy", "Least busy (fewest calls in flight)"),
)
DEFAULT_STRATEGY = "health_aware"

# Headroom reported by the upstream is a snapshot of a sliding window; past this age it says
# more about the past than about the next call, so it stops counting against the key.
HEADROOM_FRESH_SECONDS = 60.0
# Below this fraction of its window left (requests or tokens, whichever is tighter), a healthy
# key is tried after the healthy keys that have more: it is the next to answer 429.
HEADROOM_LOW_WATER = 0.1


@dataclass(frozen=True)
class Candidate:
    key_id: str
    priority: int  # lower is tried first
    weight: int
    state: KeyState
    inflight: int = 0


def order_candidates(
    candidates: Iterable[Candidate],
    *,
    strategy: str,
    rr: int,
    now: float,
    rng: random.Random,
) -> list[Candidate]:
    """The available candidates in the order to try them.

    `rr` is a round-robin counter shared by every process (the store's `next_rr`), so ties
    rotate across the whole deployment rather than per worker.
    """
    available = []
    for c in candidates:
        state = effective_state(c.state, now=now)
        if state.status in (KeyStatus.ACTIVE, KeyStatus.PROBING):
            available.append(c if state is c.state else replace(c, state=state))
    available.sort(key=lambda c: c.key_id)  # a stable base so rotation means the same everywhere

    if strategy == "health_aware":
        return _rotate_ties(
            available, key=lambda c: (_health_tier(c.state, now=now), c.priority, -c.weight), rr=rr
        )
    if strategy == "round_robin":
        return _rotate(available, rr)
    if strategy == "priority":
        return sorted(available, key=lambda c: c.priority)
    if strategy == "weighted":
        return _weighted(available, rng=rng)
    if strategy == "least_busy":
        return _rotate_ties(available, key=lambda c: c.inflight, rr=rr)
    raise ValueError(f"unknown rotation strategy {strategy!r}")


def earliest_return(
    candidates_or_states: Iterable[Candidate | KeyState], *, now: float
) -> float | None:
    """Epoch time when the first benched key comes back by timer (for a 503's Retry-After).

    `now` if a key is available already; None when no key will come back by waiting alone
    (all quarantined or disabled).
    """
    best: float | None = None
    for item in candidates_or_states:
        state = item.state if isinstance(item, Candidate) else item
        current = effective_state(state, now=now)
        if current.status in (KeyStatus.ACTIVE, KeyStatus.PROBING):
            return now
        when = returns_at(current)
        if when is not None and (best is None or when < best):
            best = when
    return best


def _health_tier(state: KeyState, *, now: float) -> int:
    # 0: healthy, 1: healthy but nearly out of headroom, 2: probing (one trial call, unproven),
    # 3: told us it has nothing left. A key out of headroom is still tried last rather than
    # skipped: windows refill and the numbers we hold may be a few seconds old.
    fresh = state.headroom_at is not None and now - state.headroom_at < HEADROOM_FRESH_SECONDS
    if fresh and (state.remaining_requests == 0 or state.remaining_tokens == 0):
        return 3
    if state.status == KeyStatus.PROBING:
        return 2
    if fresh and _headroom_fraction(state) < HEADROOM_LOW_WATER:
        return 1
    return 0


def _headroom_fraction(state: KeyState) -> float:
    """The tighter of requests and tokens left, as a fraction of the window; 1.0 if unknown."""
    fractions = [
        remaining / limit
        for remaining, limit in (
            (state.remaining_requests, state.limit_requests),
            (state.remaining_tokens, state.limit_tokens),
        )
        if remaining is not None and limit
    ]
    return min(fractions, default=1.0)


def _rotate(items: Sequence[Candidate], rr: int) -> list[Candidate]:
    if not items:
        return []
    shift = rr % len(items)
    return [*items[shift:], *items[:shift]]


def _rotate_ties(
    items: Sequence[Candidate], *, key: Callable[[Candidate], Any], rr: int
) -> list[Candidate]:
    ordered = sorted(items, key=key)
    out: list[Candidate] = []
    for _, group in groupby(ordered, key=key):
        out.extend(_rotate(list(group), rr))
    return out


def _weighted(items: Sequence[Candidate], *, rng: random.Random) -> list[Candidate]:
    # Efraimidis-Spirakis: sorting by u**(1/w) is a weighted draw without replacement, in one
    # pass. Keys with no weight only come after every weighted key.
    weighted = [c for c in items if c.weight > 0]
    unweighted = [c for c in items if c.weight <= 0]
    scored = sorted(weighted, key=lambda c: rng.random() ** (1.0 / c.weight), reverse=True)
    return scored + unweighted
