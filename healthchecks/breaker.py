"""The circuit breaker of one upstream endpoint. Pure: no I/O, no clock, no Django.

Like keys/health.py, every function takes the stored state and `now` and returns a new state,
so the same rules run in process, inside a database transaction and inside a Redis one.

- closed → open: the probes say the endpoint is down (healthchecks.services decides when), or
  live traffic failed too often (see `Window`). The open period doubles with each trip that was
  not followed by a close.
- open → half_open: lazily, once `open_until` has passed; nothing has to wake up for it.
- half_open: exactly one trial decides. A live request or a probe claims the slot before it is
  sent (`claim_trial`), so only one is ever in flight; what else was already in flight when the
  open period ran out does not count. Success closes the breaker, failure opens it again with a
  longer wait.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from typing import Any


class BreakerStatus(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True)
class BreakerPolicy:
    open_seconds: float = 30.0
    max_open_seconds: float = 600.0
    # Live traffic: trip when at least `failure_rate` of at least `min_calls` calls in the last
    # `window_seconds` failed (5xx, timeouts, connection errors; never 4xx or 429).
    window_seconds: float = 60.0
    min_calls: int = 10
    failure_rate: float = 0.5
    # A trial that never reports (its process died) frees the half-open slot after this; a
    # probe holds it for at least twice its own timeout (healthchecks.services).
    trial_timeout_seconds: float = 60.0


@dataclass
class BreakerState:
    status: BreakerStatus = BreakerStatus.CLOSED
    open_until: float = 0.0  # epoch seconds; when an open breaker turns half-open
    trips: int = 0  # trips since the last close: the exponent of the open period
    trial_until: float = 0.0  # the trial (a live request or a probe) holds the slot until then
    changed_at: float = 0.0
    reason: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: str | bytes | None) -> BreakerState:
        """Inverse of `to_json`; anything unreadable is a closed breaker (fail open)."""
        try:
            data = json.loads(raw) if raw else {}
            return cls.from_dict(data if isinstance(data, dict) else {})
        except (ValueError, TypeError):
            return cls()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BreakerState:
        try:
            return cls(
                status=BreakerStatus(data.get("status", BreakerStatus.CLOSED)),
                open_until=float(data.get("open_until", 0.0)),
                trips=int(data.get("trips", 0)),
                trial_until=float(data.get("trial_until", 0.0)),
                changed_at=float(data.get("changed_at", 0.0)),
                reason=str(data.get("reason", "")),
            )
        except (ValueError, TypeError):
            return cls()


def effective(state: BreakerState, *, now: float) -> BreakerState:
    """The state as of `now`: an open breaker whose wait is over is half-open."""
    if state.status == BreakerStatus.OPEN and state.open_until <= now:
        return replace(
            state,
            status=BreakerStatus.HALF_OPEN,
            trial_until=0.0,
            changed_at=max(state.changed_at, state.open_until),
            reason="the open period is over",
        )
    return state


def trip(state: BreakerState, *, now: float, policy: BreakerPolicy, reason: str) -> BreakerState:
    current = effective(state, now=now)
    if current.status == BreakerStatus.OPEN:
        # More failures of the outage that opened it: the wait is not stretched by them.
        return current
    trips = current.trips + 1
    wait = min(policy.open_seconds * 2 ** (trips - 1), policy.max_open_seconds)
    return BreakerState(
        status=BreakerStatus.OPEN,
        open_until=now + wait,
        trips=trips,
        changed_at=now,
        reason=reason,
    )


def close(state: BreakerState, *, now: float, reason: str) -> BreakerState:
    if state.status == BreakerStatus.CLOSED:
        return state
    return BreakerState(status=BreakerStatus.CLOSED, changed_at=now, reason=reason)


def claim_trial(
    state: BreakerState, *, now: float, policy: BreakerPolicy
) -> tuple[BreakerState, bool]:
    """Half-open and nobody is trying: the caller becomes the one trial request."""
    current = effective(state, now=now)
    if current.status != BreakerStatus.HALF_OPEN or current.trial_until > now:
        return current, False
    return replace(current, trial_until=now + policy.trial_timeout_seconds), True


def release_trial(state: BreakerState, *, now: float) -> BreakerState:
    """A claimed trial that was never sent (no key of the endpoint was available)."""
    current = effective(state, now=now)
    if current.status != BreakerStatus.HALF_OPEN:
        return current
    return replace(current, trial_until=0.0)


def trial_result(
    state: BreakerState, *, ok: bool, now: float, policy: BreakerPolicy, reason: str
) -> BreakerState:
    """The live request or probe that claimed the half-open slot has its answer."""
    current = effective(state, now=now)
    if current.status != BreakerStatus.HALF_OPEN:
        return current  # an operator or a probe decided meanwhile
    if ok:
        return close(current, now=now, reason=reason)
    return trip(current, now=now, policy=policy, reason=reason)


def probe_result(
    state: BreakerState,
    *,
    ok: bool,
    tripping: bool,
    trial: bool,
    now: float,
    policy: BreakerPolicy,
    reason: str,
) -> BreakerState:
    """A probe finished. `tripping`: the probes now say the endpoint is down (see services).
    `trial`: this probe claimed the half-open slot (`claim_trial`) before it was sent."""
    if trial:
        return trial_result(state, ok=ok, now=now, policy=policy, reason=reason)
    current = effective(state, now=now)
    if current.status == BreakerStatus.CLOSED and not ok and tripping:
        return trip(current, now=now, policy=policy, reason=reason)
    return current  # open: the wait runs its course; half-open: only the trial decides


def transitions(before: BreakerState, after: BreakerState, *, now: float) -> list[str]:
    """The statuses passed through, e.g. ["open", "half_open", "closed"] when a probe closes a
    breaker whose open period ran out unnoticed. Empty when nothing changed."""
    path = [before.status.value]
    middle = effective(before, now=now).status.value
    if middle != path[-1]:
        path.append(middle)
    if after.status.value != path[-1]:
        path.append(after.status.value)
    return path if len(path) > 1 else []


@dataclass
class Window:
    """Live-traffic outcomes of one endpoint over the last `window_seconds`, in ten buckets.

    Per process and in memory: it is updated on every call, so it must cost nothing. Each web
    process judges the traffic it sees; a trip in any of them opens the shared breaker.
    """

    policy: BreakerPolicy
    # bucket number -> [calls, failures]
    buckets: dict[int, list[int]] = field(default_factory=dict)

    def _bucket_seconds(self) -> float:
        return max(self.policy.window_seconds / 10, 0.001)

    def add(self, *, failed: bool, now: float) -> None:
        number = int(now // self._bucket_seconds())
        bucket = self.buckets.get(number)
        if bucket is None:
            oldest = number - 9
            for old in [n for n in self.buckets if n < oldest]:
                del self.buckets[old]
            bucket = self.buckets[number] = [0, 0]
        bucket[0] += 1
        bucket[1] += int(failed)

    def totals(self, *, now: float) -> tuple[int, int]:
        """(calls, failures) within the window."""
        oldest = int(now // self._bucket_seconds()) - 9
        calls = failures = 0
        for number, (c, f) in self.buckets.items():
            if number >= oldest:
                calls += c
                failures += f
        return calls, failures

    def should_trip(self, *, now: float) -> bool:
        calls, failures = self.totals(now=now)
        return calls >= self.policy.min_calls and failures >= self.policy.failure_rate * calls

    def clear(self) -> None:
        self.buckets.clear()
