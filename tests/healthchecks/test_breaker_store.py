"""The shared breaker store of this leg (the database embedded, Redis scaled out)."""

from __future__ import annotations

import threading

import pytest

from healthchecks import breaker
from healthchecks.breaker import BreakerState, BreakerStatus
from healthchecks.breaker_store import (
    BreakerStore,
    DatabaseBreakerStore,
    MemoryBreakerStore,
    RedisBreakerStore,
    get_breaker_store,
)
from healthchecks.breakers import breaker_policy

NOW = 1_000_000.0


def test_this_leg_uses_the_store_every_process_can_see(settings):
    expected = RedisBreakerStore if settings.REDIS_URL else DatabaseBreakerStore
    assert isinstance(get_breaker_store(), expected)


@pytest.mark.django_db
def test_updates_are_stored_and_read_back_for_every_endpoint():
    store = get_breaker_store()
    assert store.load_all() == {}
    policy = breaker_policy()
    before, after, extra = store.update(
        "https://a.test/v1",
        lambda s: (breaker.trip(s, now=NOW, policy=policy, reason="r"), "extra"),
    )
    assert before == BreakerState() and after.status == BreakerStatus.OPEN and extra == "extra"
    store.update("https://b.test/v1", lambda s: (s, None))
    loaded = store.load_all()
    assert set(loaded) == {"https://a.test/v1", "https://b.test/v1"}
    assert loaded["https://a.test/v1"] == after
    assert store.get("https://c.test/v1") == BreakerState()
    store.clear()
    assert store.load_all() == {}


def claims_at_once(store: BreakerStore, endpoint: str, *, threads: int = 8) -> list[bool]:
    policy = breaker_policy()
    store.update(endpoint, lambda s: (breaker.trip(s, now=NOW, policy=policy, reason="r"), None))
    later = NOW + policy.open_seconds + 1
    wins: list[bool] = []
    start = threading.Barrier(threads)

    def claim() -> None:
        from django.db import connection

        start.wait()
        try:
            _, _, won = store.update(
                endpoint, lambda s: breaker.claim_trial(s, now=later, policy=policy)
            )
            wins.append(won)
        finally:
            connection.close()

    workers = [threading.Thread(target=claim) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(10)
    return wins


@pytest.mark.scaled
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("kind", ["redis", "postgres"])
def test_processes_claiming_the_half_open_trial_at_once_get_exactly_one(kind: str):
    """Redis transactions and Postgres row locks, under contention from many threads."""
    store = get_breaker_store() if kind == "redis" else DatabaseBreakerStore()
    wins = claims_at_once(store, f"https://race.test/{kind}")
    assert sorted(wins) == [False] * 7 + [True]


def test_the_memory_store_applies_transitions_in_order():
    store = MemoryBreakerStore()
    policy = breaker_policy()
    store.update("e", lambda s: (breaker.trip(s, now=NOW, policy=policy, reason="r"), None))
    assert store.get("e").status == BreakerStatus.OPEN
