from __future__ import annotations

import random
from collections import Counter

import pytest

from keys.health import KeyState, KeyStatus
from keys.strategies import STRATEGIES, Candidate, earliest_return, order_candidates

NOW = 1_000_000.0


def cand(
    key_id: str,
    *,
    priority: int = 0,
    weight: int = 1,
    inflight: int = 0,
    **state: object,
) -> Candidate:
    return Candidate(key_id, priority, weight, KeyState(**state), inflight)  # type: ignore[arg-type]


def order(cands: list[Candidate], strategy: str, *, rr: int = 0, seed: int = 0) -> list[str]:
    ordered = order_candidates(cands, strategy=strategy, rr=rr, now=NOW, rng=random.Random(seed))
    return [c.key_id for c in ordered]


BENCHED = [
    cand("cooling", status=KeyStatus.COOLDOWN, cooldown_until=NOW + 10),
    cand("exhausted", status=KeyStatus.EXHAUSTED, exhausted_until=NOW + 10),
    cand("quarantined", status=KeyStatus.QUARANTINED, quarantine_until=NOW - 10),
    cand("disabled", status=KeyStatus.DISABLED),
]


@pytest.mark.parametrize("strategy", [name for name, _ in STRATEGIES])
def test_every_strategy_returns_only_available_keys(strategy: str) -> None:
    cands = [*BENCHED, cand("b"), cand("a")]
    assert sorted(order(cands, strategy)) == ["a", "b"]


@pytest.mark.parametrize("strategy", [name for name, _ in STRATEGIES])
def test_a_cooldown_that_has_ended_makes_the_key_available_again(strategy: str) -> None:
    cands = [cand("a", status=KeyStatus.COOLDOWN, cooldown_until=NOW - 1)]
    ordered = order_candidates(cands, strategy=strategy, rr=0, now=NOW, rng=random.Random(0))
    assert [c.state.status for c in ordered] == [KeyStatus.ACTIVE]


def test_strategies_have_labels_for_django_choices() -> None:
    names = [name for name, _ in STRATEGIES]
    assert names[0] == "health_aware"
    assert set(names) == {"health_aware", "round_robin", "priority", "weighted", "least_busy"}
    assert all(label for _, label in STRATEGIES)


def test_an_unknown_strategy_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown rotation strategy"):
        order([cand("a")], "fastest")


def test_health_aware_puts_keys_without_headroom_last() -> None:
    cands = [
        cand("empty", remaining_requests=0, headroom_at=NOW - 5),
        cand("fine", priority=5, remaining_requests=10, headroom_at=NOW - 5),
    ]
    assert order(cands, "health_aware") == ["fine", "empty"]


def test_health_aware_tries_keys_nearly_out_of_headroom_after_those_with_more() -> None:
    cands = [
        cand("low", remaining_requests=5, limit_requests=100, headroom_at=NOW - 5),
        cand("roomy", priority=5, remaining_requests=60, limit_requests=100, headroom_at=NOW - 5),
        cand("unknown", priority=9),
    ]
    assert order(cands, "health_aware") == ["roomy", "unknown", "low"]


def test_health_aware_judges_headroom_by_the_tighter_of_requests_and_tokens() -> None:
    tokens_low = cand(
        "tokens-low",
        remaining_requests=90,
        limit_requests=100,
        remaining_tokens=1_000,
        limit_tokens=100_000,
        headroom_at=NOW - 5,
    )
    assert order([tokens_low, cand("other", priority=3)], "health_aware") == [
        "other",
        "tokens-low",
    ]


def test_health_aware_keeps_priority_first_among_keys_above_the_low_water_mark() -> None:
    cands = [
        cand("p1-half", priority=1, remaining_requests=50, limit_requests=100, headroom_at=NOW),
        cand("p0-fifth", remaining_requests=20, limit_requests=100, headroom_at=NOW),
    ]
    assert order(cands, "health_aware") == ["p0-fifth", "p1-half"]


def test_health_aware_rotates_ties_among_keys_low_on_headroom() -> None:
    low = {"remaining_requests": 1, "limit_requests": 100, "headroom_at": NOW}
    cands = [cand("b", **low), cand("a", **low), cand("fine")]
    assert order(cands, "health_aware", rr=0) == ["fine", "a", "b"]
    assert order(cands, "health_aware", rr=1) == ["fine", "b", "a"]


def test_health_aware_prefers_a_key_low_on_headroom_to_probing_or_empty_ones() -> None:
    cands = [
        cand("empty", remaining_requests=0, limit_requests=100, headroom_at=NOW),
        cand("probing", status=KeyStatus.PROBING),
        cand("low", remaining_requests=2, limit_requests=100, headroom_at=NOW),
    ]
    assert order(cands, "health_aware") == ["low", "probing", "empty"]


def test_health_aware_ignores_low_headroom_once_it_is_stale() -> None:
    cands = [
        cand("was-low", remaining_requests=1, limit_requests=100, headroom_at=NOW - 600),
        cand("other", priority=5),
    ]
    assert order(cands, "health_aware") == ["was-low", "other"]


def test_health_aware_forgets_old_headroom() -> None:
    cands = [
        cand("was-empty", remaining_tokens=0, headroom_at=NOW - 600),
        cand("other", priority=5),
    ]
    assert order(cands, "health_aware") == ["was-empty", "other"]


def test_health_aware_tries_probing_keys_after_healthy_ones() -> None:
    cands = [cand("probing", status=KeyStatus.PROBING), cand("healthy", priority=9)]
    assert order(cands, "health_aware") == ["healthy", "probing"]


def test_health_aware_prefers_lower_priority_then_higher_weight() -> None:
    cands = [cand("p1", priority=1, weight=9), cand("p0-light"), cand("p0-heavy", weight=5)]
    assert order(cands, "health_aware") == ["p0-heavy", "p0-light", "p1"]


def test_health_aware_rotates_ties_round_robin() -> None:
    cands = [cand("c"), cand("a"), cand("b"), cand("z", priority=1)]
    assert order(cands, "health_aware", rr=0) == ["a", "b", "c", "z"]
    assert order(cands, "health_aware", rr=1) == ["b", "c", "a", "z"]
    assert order(cands, "health_aware", rr=5) == ["c", "a", "b", "z"]


def test_round_robin_rotates_the_available_keys() -> None:
    cands = [cand("c"), cand("b"), *BENCHED, cand("a")]
    firsts = [order(cands, "round_robin", rr=rr)[0] for rr in range(6)]
    assert firsts == ["a", "b", "c", "a", "b", "c"]


def test_priority_orders_by_priority_then_key_id() -> None:
    cands = [cand("b", priority=2), cand("c", priority=1), cand("a", priority=2)]
    assert order(cands, "priority", rr=7) == ["c", "a", "b"]


def test_weighted_follows_the_weights() -> None:
    cands = [cand("heavy", weight=9), cand("light", weight=1)]
    firsts = Counter(order(cands, "weighted", seed=seed)[0] for seed in range(2000))
    assert 0.85 < firsts["heavy"] / 2000 < 0.95


def test_weighted_tries_zero_weight_keys_only_after_the_rest() -> None:
    cands = [cand("zero", weight=0), cand("one", weight=1), cand("two", weight=2)]
    for seed in range(50):
        ordered = order(cands, "weighted", seed=seed)
        assert ordered[-1] == "zero"
        assert sorted(ordered) == ["one", "two", "zero"]


def test_weighted_still_offers_a_zero_weight_key_when_it_is_the_only_one() -> None:
    assert order([cand("zero", weight=0)], "weighted") == ["zero"]


def test_least_busy_prefers_the_fewest_calls_in_flight() -> None:
    cands = [cand("busy", inflight=5), cand("idle-b"), cand("idle-a"), cand("some", inflight=1)]
    assert order(cands, "least_busy", rr=0) == ["idle-a", "idle-b", "some", "busy"]
    assert order(cands, "least_busy", rr=1) == ["idle-b", "idle-a", "some", "busy"]


def test_nothing_available_gives_an_empty_list() -> None:
    assert order(BENCHED, "health_aware") == []


def test_earliest_return_is_the_first_timer_to_run_out() -> None:
    cands = [
        cand("a", status=KeyStatus.COOLDOWN, cooldown_until=NOW + 30),
        cand("b", status=KeyStatus.EXHAUSTED, exhausted_until=NOW + 10),
        cand("q", status=KeyStatus.QUARANTINED, quarantine_until=NOW + 1),
    ]
    assert earliest_return(cands, now=NOW) == NOW + 10
    assert earliest_return([c.state for c in cands], now=NOW) == NOW + 10


def test_earliest_return_is_now_when_a_key_is_available() -> None:
    assert earliest_return([*BENCHED, cand("a")], now=NOW) == NOW


def test_earliest_return_is_none_when_no_timer_will_help() -> None:
    assert earliest_return([BENCHED[2], BENCHED[3]], now=NOW) is None
    assert earliest_return([], now=NOW) is None
