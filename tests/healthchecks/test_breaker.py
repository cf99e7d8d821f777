"""The breaker state machine (healthchecks/breaker.py): pure functions, explicit clock."""

from __future__ import annotations

from healthchecks.breaker import (
    BreakerPolicy,
    BreakerState,
    BreakerStatus,
    Window,
    claim_trial,
    close,
    effective,
    probe_result,
    release_trial,
    transitions,
    trial_result,
    trip,
)

NOW = 1_000_000.0
POLICY = BreakerPolicy(open_seconds=30, max_open_seconds=100, window_seconds=60, min_calls=10)


def opened(now: float = NOW) -> BreakerState:
    return trip(BreakerState(), now=now, policy=POLICY, reason="test")


def test_a_trip_opens_the_breaker_for_the_open_period():
    state = opened()
    assert state.status == BreakerStatus.OPEN
    assert state.open_until == NOW + 30
    assert effective(state, now=NOW + 29.9).status == BreakerStatus.OPEN


def test_an_open_breaker_turns_half_open_by_itself_when_the_period_is_over():
    state = opened()
    later = effective(state, now=NOW + 30)
    assert later.status == BreakerStatus.HALF_OPEN
    assert later.changed_at == NOW + 30
    assert state.status == BreakerStatus.OPEN  # the stored state is untouched


def test_more_failures_while_open_do_not_stretch_the_wait():
    state = opened()
    again = trip(state, now=NOW + 10, policy=POLICY, reason="again")
    assert again.open_until == NOW + 30 and again.trips == 1


def test_half_open_lets_exactly_one_trial_through():
    state = opened()
    t = NOW + 31
    state, first = claim_trial(state, now=t, policy=POLICY)
    assert first
    state, second = claim_trial(state, now=t + 0.1, policy=POLICY)
    assert not second


def test_a_trial_that_never_reports_frees_the_slot_after_its_timeout():
    state, _ = claim_trial(opened(), now=NOW + 31, policy=POLICY)
    _, again = claim_trial(state, now=NOW + 31 + POLICY.trial_timeout_seconds, policy=POLICY)
    assert again


def test_a_released_trial_can_be_claimed_again():
    state, _ = claim_trial(opened(), now=NOW + 31, policy=POLICY)
    state = release_trial(state, now=NOW + 32)
    _, claimed = claim_trial(state, now=NOW + 32, policy=POLICY)
    assert claimed


def test_a_successful_trial_closes_the_breaker_and_forgets_the_backoff():
    state, _ = claim_trial(opened(), now=NOW + 31, policy=POLICY)
    state = trial_result(state, ok=True, now=NOW + 32, policy=POLICY, reason="ok")
    assert state.status == BreakerStatus.CLOSED and state.trips == 0
    assert trip(state, now=NOW + 40, policy=POLICY, reason="x").open_until == NOW + 40 + 30


def test_a_failed_trial_reopens_with_a_doubled_wait_up_to_the_cap():
    state = opened()
    t = NOW
    waits = []
    for _ in range(4):
        t = state.open_until + 1
        state, _ = claim_trial(state, now=t, policy=POLICY)
        state = trial_result(state, ok=False, now=t, policy=POLICY, reason="failed")
        assert state.status == BreakerStatus.OPEN
        waits.append(state.open_until - t)
    assert waits == [60, 100, 100, 100]


def test_a_trial_result_after_an_operator_closed_it_changes_nothing():
    state, _ = claim_trial(opened(), now=NOW + 31, policy=POLICY)
    state = close(state, now=NOW + 32, reason="operator")
    after = trial_result(state, ok=False, now=NOW + 33, policy=POLICY, reason="late")
    assert after.status == BreakerStatus.CLOSED


def probe(
    state: BreakerState, *, ok: bool, at: float, tripping: bool = False, trial: bool = False
) -> BreakerState:
    return probe_result(
        state, ok=ok, tripping=tripping, trial=trial, now=at, policy=POLICY, reason="r"
    )


def test_probes_trip_a_closed_breaker_only_when_they_say_the_endpoint_is_down():
    assert probe(BreakerState(), ok=False, at=NOW).status == BreakerStatus.CLOSED
    assert probe(BreakerState(), ok=False, at=NOW, tripping=True).status == BreakerStatus.OPEN


def test_a_probe_success_does_not_close_a_breaker_that_is_still_open():
    assert probe(opened(), ok=True, at=NOW + 5).status == BreakerStatus.OPEN


def test_a_probe_that_claimed_the_half_open_trial_decides_it():
    claimed, won = claim_trial(opened(), now=NOW + 31, policy=POLICY)
    assert won
    assert probe(claimed, ok=True, at=NOW + 32, trial=True).status == BreakerStatus.CLOSED
    failed = probe(claimed, ok=False, at=NOW + 32, trial=True)
    assert failed.status == BreakerStatus.OPEN and failed.trips == 2


def test_a_probe_that_did_not_claim_the_trial_never_decides_a_half_open_breaker():
    # Sent while the breaker was still open, or a ping of an endpoint with an HTTP probe.
    assert probe(opened(), ok=True, at=NOW + 31).status == BreakerStatus.HALF_OPEN
    assert probe(opened(), ok=False, at=NOW + 31, tripping=True).status == BreakerStatus.HALF_OPEN
    live, _ = claim_trial(opened(), now=NOW + 31, policy=POLICY)
    assert probe(live, ok=True, at=NOW + 31.5).status == BreakerStatus.HALF_OPEN


def test_transitions_name_the_half_open_step_a_lapsed_open_period_went_through():
    closed = close(effective(opened(), now=NOW + 31), now=NOW + 31, reason="ok")
    assert transitions(opened(), closed, now=NOW + 31) == ["open", "half_open", "closed"]
    assert transitions(BreakerState(), opened(), now=NOW) == ["closed", "open"]
    assert transitions(opened(), opened(), now=NOW + 1) == []


def test_state_survives_a_round_trip_and_garbage_reads_as_closed():
    state = opened()
    assert BreakerState.from_json(state.to_json()) == state
    assert BreakerState.from_json("not json") == BreakerState()
    assert BreakerState.from_json('{"status": "exploded"}') == BreakerState()
    assert BreakerState.from_json(None) == BreakerState()


def test_the_window_trips_at_the_failure_rate_once_there_are_enough_calls():
    window = Window(POLICY)
    for i in range(9):
        window.add(failed=True, now=NOW + i)
    assert not window.should_trip(now=NOW + 9)  # 9 calls: below the minimum
    window.add(failed=False, now=NOW + 9)
    assert window.should_trip(now=NOW + 9)  # 9 of 10 failed
    assert window.totals(now=NOW + 9) == (10, 9)


def test_the_window_forgets_calls_older_than_its_length():
    window = Window(POLICY)
    for i in range(10):
        window.add(failed=True, now=NOW + i)
    assert not window.should_trip(now=NOW + 75)
    window.add(failed=True, now=NOW + 75)
    assert window.totals(now=NOW + 75) == (1, 1)
    assert len(window.buckets) <= 10


def test_the_window_does_not_trip_below_the_rate():
    window = Window(POLICY)
    for i in range(20):
        window.add(failed=i % 3 == 0, now=NOW + i)  # 7 of 20
    assert not window.should_trip(now=NOW + 20)
