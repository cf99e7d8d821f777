from __future__ import annotations

import random
from typing import Any

import pytest

from keys.health import (
    CallResult,
    KeyPolicy,
    KeyState,
    KeyStatus,
    Outcome,
    apply_manual,
    apply_outcome,
    apply_recheck,
    effective_state,
    is_available,
    needs_recheck,
    returns_at,
)
from keys.ratelimits import Headroom

NOW = 1_000_000.0
POLICY = KeyPolicy(jitter_ratio=0.0)


def hit(state: KeyState, outcome: Outcome, *, now: float = NOW, **kw: Any) -> KeyState:
    policy = kw.pop("policy", POLICY)
    rng = kw.pop("rng", None)
    return apply_outcome(state, CallResult(outcome, now=now, policy=policy, **kw), rng=rng)


def test_a_new_key_is_active_and_available() -> None:
    state = KeyState()
    assert state.status == KeyStatus.ACTIVE
    assert is_available(state, now=NOW)


def test_it_honours_retry_after() -> None:
    state = hit(KeyState(), Outcome.RATE_LIMITED, retry_after=42)
    assert state.status == KeyStatus.COOLDOWN
    assert state.cooldown_until == NOW + 42
    assert not is_available(state, now=NOW + 41)
    assert is_available(state, now=NOW + 42)
    assert effective_state(state, now=NOW + 43).status == KeyStatus.ACTIVE


def test_jitter_never_shortens_a_server_given_retry_after() -> None:
    policy = KeyPolicy(jitter_ratio=0.5)
    rng = random.Random(1)
    waits = set()
    for _ in range(200):
        state = hit(KeyState(), Outcome.RATE_LIMITED, retry_after=10, policy=policy, rng=rng)
        assert NOW + 10 <= state.cooldown_until <= NOW + 15
        waits.add(state.cooldown_until)
    assert len(waits) > 100, "keys cooled together would all come back in the same instant"


def test_the_cooldown_after_repeated_upstream_errors_is_jittered_too() -> None:
    policy = KeyPolicy(cooldown_seconds=30, jitter_ratio=0.2)
    rng = random.Random(2)
    waits = set()
    for _ in range(200):
        state = KeyState()
        for _ in range(policy.upstream_error_threshold):
            state = hit(state, Outcome.UPSTREAM_ERROR, policy=policy, rng=rng)
        assert state.status == KeyStatus.COOLDOWN
        assert NOW + 30 <= state.cooldown_until <= NOW + 36
        waits.add(state.cooldown_until)
    assert len(waits) > 100, "keys of a failing endpoint would all come back in the same instant"


def test_repeated_429s_back_off_exponentially_up_to_the_cap() -> None:
    policy = KeyPolicy(cooldown_seconds=30, max_cooldown_seconds=100, jitter_ratio=0)
    state, now, waits = KeyState(), NOW, []
    for _ in range(4):
        state = hit(state, Outcome.RATE_LIMITED, now=now, policy=policy)
        waits.append(state.cooldown_until - now)
        now = state.cooldown_until + 1  # the key came back and was rate limited again
    assert waits == [30, 60, 100, 100]


def test_a_burst_of_429s_from_one_moment_does_not_escalate_the_backoff() -> None:
    state = KeyState()
    for _ in range(10):  # ten concurrent calls all answered 429
        state = hit(state, Outcome.RATE_LIMITED)
    assert state.cooldown_until == NOW + POLICY.cooldown_seconds
    assert state.consecutive_rate_limits == 1
    assert state.total_failures == 10


def test_a_success_after_the_cooldown_resets_the_backoff() -> None:
    state = hit(KeyState(), Outcome.RATE_LIMITED)
    later = state.cooldown_until + 1
    state = hit(state, Outcome.SUCCESS, now=later)
    state = hit(state, Outcome.RATE_LIMITED, now=later + 1)
    assert state.cooldown_until == later + 1 + POLICY.cooldown_seconds


def test_timers_never_move_backwards() -> None:
    state = hit(KeyState(), Outcome.RATE_LIMITED, retry_after=120)
    state = hit(state, Outcome.RATE_LIMITED, now=NOW + 1, retry_after=5)
    assert state.cooldown_until == NOW + 120
    state = hit(state, Outcome.QUOTA_EXHAUSTED, now=NOW + 2)
    first = state.exhausted_until
    state = hit(state, Outcome.QUOTA_EXHAUSTED, now=NOW + 3, retry_after=1)
    assert state.exhausted_until >= first


def test_a_late_success_does_not_end_a_cooldown() -> None:
    state = hit(KeyState(), Outcome.RATE_LIMITED, retry_after=60)
    state = hit(state, Outcome.SUCCESS, now=NOW + 1)  # a call that started before the 429
    assert state.status == KeyStatus.COOLDOWN
    assert state.cooldown_until == NOW + 60
    assert state.total_successes == 1
    assert not is_available(state, now=NOW + 2)


def test_quota_exhaustion_pauses_the_key_then_probes_it() -> None:
    state = hit(KeyState(), Outcome.QUOTA_EXHAUSTED)
    assert state.status == KeyStatus.EXHAUSTED
    assert state.exhausted_until == NOW + POLICY.exhausted_seconds
    assert returns_at(state) == NOW + POLICY.exhausted_seconds
    later = NOW + POLICY.exhausted_seconds + 1
    assert effective_state(state, now=later).status == KeyStatus.PROBING
    assert is_available(state, now=later)
    state = hit(state, Outcome.SUCCESS, now=later)
    assert state.status == KeyStatus.ACTIVE


def test_quota_exhaustion_uses_a_longer_retry_after() -> None:
    state = hit(KeyState(), Outcome.QUOTA_EXHAUSTED, retry_after=2 * POLICY.exhausted_seconds)
    assert state.exhausted_until == NOW + 2 * POLICY.exhausted_seconds


def test_a_failed_probe_sends_the_key_back_to_exhausted() -> None:
    state = hit(KeyState(), Outcome.QUOTA_EXHAUSTED)
    later = state.exhausted_until + 1
    state = hit(state, Outcome.QUOTA_EXHAUSTED, now=later)
    assert state.status == KeyStatus.EXHAUSTED
    assert state.exhausted_until == later + POLICY.exhausted_seconds


def test_an_auth_failure_quarantines_until_a_successful_recheck() -> None:
    state = hit(KeyState(), Outcome.AUTH_FAILED)
    assert state.status == KeyStatus.QUARANTINED
    assert state.consecutive_auth_failures == 1
    assert returns_at(state) is None
    later = NOW + POLICY.quarantine_seconds + 1
    # The timer alone never brings the key back, it only makes it due for a re-check.
    assert effective_state(state, now=later).status == KeyStatus.QUARANTINED
    assert not is_available(state, now=later)
    assert not needs_recheck(state, NOW + 1)
    assert needs_recheck(state, later)
    state = apply_recheck(state, ok=True, now=later, policy=POLICY)
    assert state.status == KeyStatus.PROBING
    state = hit(state, Outcome.SUCCESS, now=later + 1)
    assert state.status == KeyStatus.ACTIVE
    assert state.consecutive_auth_failures == 0


def test_a_failed_recheck_doubles_the_quarantine_then_disables() -> None:
    policy = KeyPolicy(quarantine_seconds=100, auth_failures_to_disable=3, jitter_ratio=0)
    state = hit(KeyState(), Outcome.AUTH_FAILED, policy=policy)
    state = apply_recheck(state, ok=False, now=NOW + 101, policy=policy)
    assert state.status == KeyStatus.QUARANTINED
    assert state.quarantine_until == NOW + 101 + 200
    state = apply_recheck(state, ok=False, now=NOW + 400, policy=policy)
    assert state.status == KeyStatus.DISABLED


def test_a_burst_of_401s_counts_as_one_auth_failure() -> None:
    state = KeyState()
    for _ in range(5):
        state = hit(state, Outcome.AUTH_FAILED)
    assert state.status == KeyStatus.QUARANTINED
    assert state.consecutive_auth_failures == 1


def test_repeated_auth_failures_disable_the_key() -> None:
    policy = KeyPolicy(auth_failures_to_disable=2, jitter_ratio=0)
    state = hit(KeyState(), Outcome.AUTH_FAILED, policy=policy)
    state = apply_recheck(state, ok=True, now=NOW + 400, policy=policy)
    state = hit(state, Outcome.AUTH_FAILED, now=NOW + 401, policy=policy)
    assert state.status == KeyStatus.DISABLED


def test_disabled_is_sticky_until_a_person_enables_it() -> None:
    state = apply_manual(KeyState(), "disable", now=NOW)
    for outcome in Outcome:
        state = hit(state, outcome, now=NOW + 10**6)
    state = apply_recheck(state, ok=True, now=NOW + 10**6, policy=POLICY)
    assert state.status == KeyStatus.DISABLED
    assert not is_available(state, now=NOW + 10**7)
    state = apply_manual(state, "enable", now=NOW)
    assert state.status == KeyStatus.ACTIVE
    assert is_available(state, now=NOW)


def test_upstream_errors_cool_the_key_only_after_the_threshold() -> None:
    state = KeyState()
    for i in range(POLICY.upstream_error_threshold - 1):
        state = hit(state, Outcome.UPSTREAM_ERROR, now=NOW + i)
        assert state.status == KeyStatus.ACTIVE
    state = hit(state, Outcome.UPSTREAM_ERROR, now=NOW + 10, error_type="timeout")
    assert state.status == KeyStatus.COOLDOWN
    assert state.cooldown_until == NOW + 10 + POLICY.cooldown_seconds
    assert state.last_error_type == "timeout"


def test_a_success_resets_the_run_of_upstream_errors() -> None:
    state = hit(KeyState(), Outcome.UPSTREAM_ERROR)
    state = hit(state, Outcome.UPSTREAM_ERROR)
    state = hit(state, Outcome.SUCCESS)
    state = hit(state, Outcome.UPSTREAM_ERROR)
    assert state.status == KeyStatus.ACTIVE
    assert state.consecutive_failures == 1
    assert state.total_failures == 3
    assert state.total_successes == 1


def test_a_client_error_only_touches_last_used() -> None:
    before = hit(KeyState(), Outcome.UPSTREAM_ERROR)
    after = hit(before, Outcome.CLIENT_ERROR, now=NOW + 5)
    assert after.last_used_at == NOW + 5
    assert (after.total_failures, after.total_successes) == (1, 0)
    assert after.consecutive_failures == 1
    assert after.status == KeyStatus.ACTIVE


def test_it_remembers_headroom_and_the_last_error() -> None:
    headroom = Headroom(remaining_requests=0, remaining_tokens=500, limit_tokens=1000)
    state = hit(KeyState(), Outcome.RATE_LIMITED, headroom=headroom)
    assert (state.remaining_requests, state.remaining_tokens) == (0, 500)
    assert (state.limit_requests, state.limit_tokens) == (None, 1000)
    assert state.headroom_at == NOW
    assert state.last_used_at == NOW
    assert state.last_error_type == "rate_limited"


def test_apply_outcome_returns_a_new_state() -> None:
    state = KeyState()
    hit(state, Outcome.RATE_LIMITED)
    assert state == KeyState()


def test_a_stale_429_does_not_downgrade_a_quarantined_key() -> None:
    state = hit(KeyState(), Outcome.AUTH_FAILED)
    state = hit(state, Outcome.RATE_LIMITED, retry_after=5)
    assert state.status == KeyStatus.QUARANTINED


def test_reset_clears_timers_and_failures_but_keeps_totals() -> None:
    state = hit(KeyState(), Outcome.SUCCESS)
    state = hit(state, Outcome.AUTH_FAILED)
    state = hit(state, Outcome.RATE_LIMITED)
    state = apply_manual(state, "reset", now=NOW + 1)
    assert state.status == KeyStatus.ACTIVE
    assert state.cooldown_until == state.quarantine_until == state.exhausted_until == 0
    assert state.consecutive_failures == state.consecutive_auth_failures == 0
    assert (state.total_successes, state.total_failures) == (1, 2)
    assert state.last_error_type is None


def test_an_unknown_manual_action_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown manual action"):
        apply_manual(KeyState(), "explode", now=NOW)  # type: ignore[arg-type]


def test_a_state_survives_a_round_trip_through_strings() -> None:
    headroom = Headroom(remaining_requests=3, limit_requests=10)
    state = hit(KeyState(), Outcome.RATE_LIMITED, headroom=headroom)
    data = state.to_dict()
    assert all(isinstance(v, str) for v in data.values())
    assert KeyState.from_dict(data) == state
    as_bytes = {k.encode(): v.encode() for k, v in data.items()}
    assert KeyState.from_dict(as_bytes) == state


def test_from_dict_tolerates_missing_and_garbage_fields() -> None:
    state = KeyState.from_dict({"status": "bogus", "total_successes": "x", "cooldown_until": ""})
    assert state == KeyState()
    assert KeyState.from_dict({}) == KeyState()


def test_a_retry_after_longer_than_the_maximum_wait_is_cut_to_it() -> None:
    policy = KeyPolicy(jitter_ratio=0.0, max_wait_seconds=3600)
    for wait in (99_999_999_999, 1e308):
        state = hit(KeyState(), Outcome.RATE_LIMITED, retry_after=wait, policy=policy)
        assert state.cooldown_until == NOW + 3600
        exhausted = hit(KeyState(), Outcome.QUOTA_EXHAUSTED, retry_after=wait, policy=policy)
        assert exhausted.exhausted_until == NOW + max(3600, policy.exhausted_seconds)


def test_a_long_run_of_429s_never_overflows_the_backoff() -> None:
    state = KeyState(consecutive_rate_limits=5000)
    policy = KeyPolicy(jitter_ratio=0.0, cooldown_seconds=30.5)
    state = hit(state, Outcome.RATE_LIMITED, policy=policy)
    assert state.cooldown_until == NOW + policy.max_cooldown_seconds


def test_a_timer_beyond_anything_the_policy_sets_is_rechecked_not_trusted() -> None:
    # Stored before waits were clamped: a 429 that said "come back in 10,000 years".
    state = KeyState(status=KeyStatus.COOLDOWN, cooldown_until=NOW + 3e11)
    assert not needs_recheck(state, NOW)  # without its policy, nothing to compare to
    assert needs_recheck(state, NOW, policy=POLICY)
    checked = apply_recheck(state, ok=True, now=NOW, policy=POLICY)
    assert checked.status == KeyStatus.PROBING
    assert checked.cooldown_until <= NOW
    assert is_available(checked, now=NOW)


def test_an_ordinary_cooldown_is_not_rechecked() -> None:
    state = hit(KeyState(), Outcome.RATE_LIMITED, retry_after=600)
    assert not needs_recheck(state, NOW, policy=POLICY)
    assert apply_recheck(state, ok=True, now=NOW, policy=POLICY).status == KeyStatus.COOLDOWN
