"""The upstream key health state machine. Pure: no I/O, no clock, no Django.

Every function takes the current state and `now` and returns a new state, so the same rules run
in process and inside a Redis transaction. Two rules shape everything here:

- Timers only move forward. Responses arrive out of order (a request started before a 429 can
  finish after it), so a new outcome may lengthen a `*_until` but never shorten it.
- Expiry is lazy. Nothing wakes up when a cooldown ends; `effective_state` works out what the
  state is *now* from the stored one, so stores never need a timer of their own.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, fields, replace
from enum import StrEnum
from typing import Any, Literal

from keys.ratelimits import Headroom


class KeyStatus(StrEnum):
    ACTIVE = "active"
    COOLDOWN = "cooldown"  # rate limited (429), back when the timer ends
    EXHAUSTED = "exhausted"  # out of quota or credit, back as `probing` when the timer ends
    QUARANTINED = "quarantined"  # 401/403, back only after a successful re-check
    PROBING = "probing"  # half-open: one trial call decides
    DISABLED = "disabled"  # by hand or by repeated auth failures; only a person undoes it


class Outcome(StrEnum):
    SUCCESS = "success"
    CLIENT_ERROR = "client_error"  # the request was bad; says nothing about the key
    RATE_LIMITED = "rate_limited"
    QUOTA_EXHAUSTED = "quota_exhausted"
    AUTH_FAILED = "auth_failed"
    UPSTREAM_ERROR = "upstream_error"  # 5xx, timeout, connection error, unreadable response


# Worse states win when outcomes overlap: a stale 429 must not turn a quarantined key into a
# merely cooling one.
_SEVERITY = {
    KeyStatus.ACTIVE: 0,
    KeyStatus.PROBING: 1,
    KeyStatus.COOLDOWN: 2,
    KeyStatus.EXHAUSTED: 3,
    KeyStatus.QUARANTINED: 4,
    KeyStatus.DISABLED: 5,
}
_AVAILABLE = frozenset({KeyStatus.ACTIVE, KeyStatus.PROBING})
# A Retry-After of 0 would let failover hand the same key straight back; one second is the
# least that moves the next attempt to another key.
_MIN_RETRY_AFTER = 1.0


@dataclass
class KeyState:
    status: KeyStatus = KeyStatus.ACTIVE
    cooldown_until: float = 0.0  # epoch seconds; 0 means no timer
    quarantine_until: float = 0.0
    exhausted_until: float = 0.0
    consecutive_failures: int = 0
    consecutive_auth_failures: int = 0
    # 429s in a row, counted once per cooldown, for exponential backoff.
    consecutive_rate_limits: int = 0
    total_successes: int = 0
    total_failures: int = 0
    last_used_at: float | None = None
    last_error_type: str | None = None
    remaining_requests: int | None = None  # last seen headroom
    remaining_tokens: int | None = None
    limit_requests: int | None = None  # the window those are counted against, if reported
    limit_tokens: int | None = None
    headroom_at: float | None = None
    changed_at: float = 0.0

    def to_dict(self) -> dict[str, str]:
        """Every field as a string, so it fits a Redis hash; None becomes ""."""
        return {k: "" if v is None else str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[Any, Any]) -> KeyState:
        """Inverse of `to_dict`; tolerates bytes, missing fields and garbage (→ defaults)."""
        clean = {
            (k.decode() if isinstance(k, bytes) else str(k)): (
                v.decode() if isinstance(v, bytes) else v
            )
            for k, v in data.items()
        }
        state = cls()
        for f in fields(cls):
            raw = clean.get(f.name)
            if raw is None:
                continue
            current = getattr(state, f.name)
            setattr(state, f.name, _coerce(f.name, raw, current))
        return state


_OPTIONAL_INTS = frozenset(
    {"remaining_requests", "remaining_tokens", "limit_requests", "limit_tokens"}
)


def _coerce(name: str, raw: Any, default: Any) -> Any:
    text = str(raw)
    try:
        if name == "status":
            return KeyStatus(text)
        if name == "last_error_type":
            return text or None
        if name in {"last_used_at", "headroom_at"}:
            return float(text) if text else None
        if name in _OPTIONAL_INTS:
            return int(text) if text else None
        if isinstance(default, float):
            return float(text)
        if isinstance(default, int):
            return int(text)
    except ValueError:
        return default
    return default


@dataclass(frozen=True)
class KeyPolicy:
    cooldown_seconds: float = 30
    quarantine_seconds: float = 300
    exhausted_seconds: float = 3600
    # Cooldowns (after a 429, or a run of 5xx) last up to this fraction longer, at random, so
    # keys benched together, in one process or many, do not all come back in the same instant.
    jitter_ratio: float = 0.1
    max_cooldown_seconds: float = 3600
    upstream_error_threshold: int = 3  # consecutive 5xx/timeouts before a short cooldown
    auth_failures_to_disable: int = 3
    # The longest an upstream may bench a key through Retry-After or a reset header
    # (LLMROTATE_MAX_UPSTREAM_WAIT_SECONDS): more is broken or hostile, and is cut to this.
    max_wait_seconds: float = 6 * 3600


def longest_timer(policy: KeyPolicy) -> float:
    """How far ahead any timer this policy sets can lie, jitter included."""
    longest = max(
        policy.max_wait_seconds,
        policy.max_cooldown_seconds,
        policy.cooldown_seconds,
        policy.exhausted_seconds,
        policy.quarantine_seconds,
    )
    return longest * (1 + policy.jitter_ratio)


def overlong(state: KeyState, *, now: float, policy: KeyPolicy) -> bool:
    """A timer further out than this policy can set: written before waits were clamped, or by
    a bug. Not trusted: the key is re-checked rather than benched for years."""
    return max(state.cooldown_until, state.exhausted_until) > now + longest_timer(policy)


def effective_state(state: KeyState, *, now: float) -> KeyState:
    """The state as of `now`: expired cooldowns become active, expired exhaustion probing.

    Quarantine does not expire by time: see `needs_recheck`.
    """
    status = state.status
    if status in (KeyStatus.DISABLED, KeyStatus.QUARANTINED):
        return state
    if status == KeyStatus.EXHAUSTED and state.exhausted_until > now:
        return state
    if status == KeyStatus.COOLDOWN and state.cooldown_until > now:
        return state
    target = {KeyStatus.EXHAUSTED: KeyStatus.PROBING, KeyStatus.COOLDOWN: KeyStatus.ACTIVE}.get(
        status, status
    )
    # A less severe timer that outlived the one that set the status still applies (a long
    # Retry-After on a key whose exhaustion just ended).
    if state.exhausted_until > now:
        target = KeyStatus.EXHAUSTED
    elif state.cooldown_until > now:
        target = KeyStatus.COOLDOWN
    if target == status:
        return state
    return replace(state, status=target, changed_at=max(state.changed_at, _expired_at(state)))


def _expired_at(state: KeyState) -> float:
    if state.status == KeyStatus.EXHAUSTED:
        return state.exhausted_until
    if state.status == KeyStatus.COOLDOWN:
        return state.cooldown_until
    return state.changed_at


def is_available(state: KeyState, *, now: float) -> bool:
    """May the key be handed out? (The one-trial limit for `probing` is the store's job.)"""
    return effective_state(state, now=now).status in _AVAILABLE


def needs_recheck(state: KeyState, now: float, *, policy: KeyPolicy | None = None) -> bool:
    """A quarantined key whose wait is over, or (given its policy) a key whose timer is not to
    be trusted (`overlong`): either should now be re-validated."""
    if state.status == KeyStatus.QUARANTINED and state.quarantine_until <= now:
        return True
    return policy is not None and overlong(state, now=now, policy=policy)


def returns_at(state: KeyState) -> float | None:
    """When an unavailable key becomes usable by timer alone; None if a timer won't do it."""
    if state.status == KeyStatus.COOLDOWN:
        return max(state.cooldown_until, state.exhausted_until)
    if state.status == KeyStatus.EXHAUSTED:
        return max(state.exhausted_until, state.cooldown_until)
    return None


@dataclass(frozen=True, slots=True)
class CallResult:
    """What one upstream call says about the key that made it: the evidence every transition
    below is computed from, handed as one value from the engine through the stores (in process,
    or inside a Redis transaction) to `apply_outcome`."""

    outcome: Outcome
    now: float
    policy: KeyPolicy
    retry_after: float | None = None  # seconds, as the upstream asked (clamped here)
    headroom: Headroom | None = None
    error_type: str | None = None


def apply_outcome(
    state: KeyState, result: CallResult, *, rng: random.Random | None = None
) -> KeyState:
    """The state after one upstream call with this key ended as `result` says."""
    outcome, now, policy = result.outcome, result.now, result.policy
    retry_after, headroom, error_type = result.retry_after, result.headroom, result.error_type
    current = effective_state(state, now=now)
    new = replace(current, last_used_at=now)
    if headroom is not None:
        new.remaining_requests = headroom.remaining_requests
        new.remaining_tokens = headroom.remaining_tokens
        new.limit_requests = headroom.limit_requests
        new.limit_tokens = headroom.limit_tokens
        new.headroom_at = now
    if outcome == Outcome.CLIENT_ERROR:
        return new
    if outcome == Outcome.SUCCESS:
        return _on_success(new, now=now)

    new.total_failures += 1
    new.consecutive_failures += 1
    new.last_error_type = error_type or outcome.value
    status = current.status
    # The key is only handed out while available, so a failure that arrives while it is
    # already benched belongs to the burst that benched it: it may extend a timer (forward
    # only) but must not escalate the punishment a second time.
    fresh = status in _AVAILABLE

    if outcome == Outcome.RATE_LIMITED:
        if fresh:
            new.consecutive_rate_limits += 1
        n = max(1, new.consecutive_rate_limits)
        if retry_after is not None:
            duration = min(max(retry_after, _MIN_RETRY_AFTER), policy.max_wait_seconds)
        else:
            # The exponent is capped: past 2**32 the cap below has long applied, and a float
            # times a huge integer overflows.
            backoff = policy.cooldown_seconds * 2 ** min(n - 1, 32)
            duration = min(backoff, policy.max_cooldown_seconds)
        new.cooldown_until = max(
            new.cooldown_until, now + _jittered(duration, policy=policy, rng=rng)
        )
        return _escalate(new, KeyStatus.COOLDOWN, now=now)

    if outcome == Outcome.QUOTA_EXHAUSTED:
        duration = max(policy.exhausted_seconds, min(retry_after or 0.0, policy.max_wait_seconds))
        new.exhausted_until = max(new.exhausted_until, now + duration)
        return _escalate(new, KeyStatus.EXHAUSTED, now=now)

    if outcome == Outcome.AUTH_FAILED:
        if status not in (KeyStatus.QUARANTINED, KeyStatus.DISABLED):
            new.consecutive_auth_failures += 1
        new.quarantine_until = max(new.quarantine_until, now + policy.quarantine_seconds)
        if new.consecutive_auth_failures >= policy.auth_failures_to_disable:
            return _escalate(new, KeyStatus.DISABLED, now=now)
        return _escalate(new, KeyStatus.QUARANTINED, now=now)

    # UPSTREAM_ERROR: one 5xx says little about the key, a run of them says the key (or its
    # account or region) is not worth trying for a while.
    if fresh and new.consecutive_failures >= policy.upstream_error_threshold:
        # An outage hits every key of the endpoint at once: without jitter they would all
        # return, and all fail again, together.
        wait = _jittered(policy.cooldown_seconds, policy=policy, rng=rng)
        new.cooldown_until = max(new.cooldown_until, now + wait)
        return _escalate(new, KeyStatus.COOLDOWN, now=now)
    return new


def _jittered(duration: float, *, policy: KeyPolicy, rng: random.Random | None) -> float:
    # Jitter only ever adds, so a server-given Retry-After is never cut short.
    uniform = rng.uniform if rng is not None else random.uniform
    return duration + uniform(0, policy.jitter_ratio * duration)


def _on_success(new: KeyState, *, now: float) -> KeyState:
    new.total_successes += 1
    if new.status not in _AVAILABLE:
        # Benched keys are not handed out, so this call began before the key was benched: it
        # proves nothing about the key now and must not end the cooldown early.
        return new
    new.consecutive_failures = 0
    new.consecutive_rate_limits = 0
    new.consecutive_auth_failures = 0
    if new.status == KeyStatus.PROBING:
        new.status = KeyStatus.ACTIVE
        new.changed_at = now
    return new


def _escalate(new: KeyState, target: KeyStatus, *, now: float) -> KeyState:
    if _SEVERITY[target] > _SEVERITY[new.status]:
        new.status = target
        new.changed_at = now
    return new


def apply_recheck(state: KeyState, *, ok: bool, now: float, policy: KeyPolicy) -> KeyState:
    """The state after re-validating a key (e.g. listing models with it) outside a request."""
    current = effective_state(state, now=now)
    if current.status == KeyStatus.DISABLED:
        return current  # sticky: only a person re-enables
    new = replace(current)
    if ok:
        untrusted = overlong(current, now=now, policy=policy)
        if new.status in (KeyStatus.QUARANTINED, KeyStatus.EXHAUSTED) or untrusted:
            # Half-open rather than active: a models list can succeed on a key that still
            # cannot complete (or has no credit left); one good live call makes it active, a
            # quota error sends it back. The check is evidence, so it may end the exhaustion
            # timer early (and an untrusted cooldown): the one place besides an operator's
            # action where a timer moves back.
            new.status = KeyStatus.PROBING
            new.exhausted_until = min(new.exhausted_until, now)
            if untrusted:
                new.cooldown_until = min(new.cooldown_until, now)
            new.changed_at = now
        return new
    new.consecutive_auth_failures += 1
    new.consecutive_failures += 1
    new.total_failures += 1
    new.last_error_type = Outcome.AUTH_FAILED.value
    cap = max(policy.quarantine_seconds, policy.max_cooldown_seconds)
    wait = min(policy.quarantine_seconds * 2 ** min(new.consecutive_auth_failures - 1, 32), cap)
    new.quarantine_until = max(new.quarantine_until, now + wait)
    if new.consecutive_auth_failures >= policy.auth_failures_to_disable:
        target = KeyStatus.DISABLED
    else:
        target = KeyStatus.QUARANTINED
    if new.status != target:
        new.status = target
        new.changed_at = now
    return new


# An operator's action on a key (admin, dashboard).
ManualAction = Literal["disable", "enable", "reset"]
MANUAL_ACTIONS: tuple[ManualAction, ...] = ("disable", "enable", "reset")


def apply_manual(state: KeyState, action: ManualAction, *, now: float) -> KeyState:
    """An operator's action. `reset` also forgets the last error and headroom; totals stay."""
    if action == "disable":
        if state.status == KeyStatus.DISABLED:
            return replace(state)
        return replace(state, status=KeyStatus.DISABLED, changed_at=now)
    if action not in ("enable", "reset"):
        raise ValueError(f"unknown manual action {action!r}")
    # The one place timers move backwards: a person decided, and that outranks any timer.
    new = replace(
        state,
        status=KeyStatus.ACTIVE,
        cooldown_until=0.0,
        quarantine_until=0.0,
        exhausted_until=0.0,
        consecutive_failures=0,
        consecutive_auth_failures=0,
        consecutive_rate_limits=0,
        changed_at=now if state.status != KeyStatus.ACTIVE else state.changed_at,
    )
    if action == "reset":
        new.last_error_type = None
        new.remaining_requests = None
        new.remaining_tokens = None
        new.limit_requests = None
        new.limit_tokens = None
        new.headroom_at = None
    return new
