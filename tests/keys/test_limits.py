"""The limiter: fixed windows with a controlled clock, all-or-nothing reservations, leases that
lapse, settlement, and the same answers from the in-process and the Redis backend."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal

import pytest

from keys.limits import (
    DAY,
    MINUTE,
    MONTH,
    REQUESTS,
    TOKENS,
    USD,
    Estimate,
    Limiter,
    LimitSpec,
    MemoryLimiter,
    Reservation,
    budget_check,
    budget_threshold_reached,
    spec_lease,
    spec_meters,
    usd_units,
    window,
)
from keys.limits_redis import RedisLimiter
from tests.conftest import REDIS_TEST_URL, redis_available


def ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


# --- windows -----------------------------------------------------------------------------


def test_a_minute_window_ends_at_the_next_whole_minute() -> None:
    wid, resets = window(MINUTE, ts("2026-12-07T12:00:59.9+00:00"), "UTC")
    assert resets == ts("2026-12-07T12:01:00+00:00")
    assert window(MINUTE, ts("2026-12-07T12:01:00+00:00"), "UTC")[0] != wid


def test_a_day_is_the_local_day_of_the_configured_zone() -> None:
    # 23:30 UTC is already the next day in Paris (UTC+1 in December).
    wid, resets = window(DAY, ts("2026-12-07T23:30:00+00:00"), "Europe/Paris")
    assert wid == "2026-12-08"
    assert resets == ts("2026-12-08T23:00:00+00:00")


def test_a_day_with_a_dst_change_is_23_hours_long() -> None:
    _, resets = window(DAY, ts("2026-03-29T00:30:00+01:00"), "Europe/Paris")
    assert resets == ts("2026-03-30T00:00:00+02:00")


def test_a_half_hour_zone_has_its_own_day_boundary() -> None:
    wid, resets = window(DAY, ts("2026-12-07T18:29:00+00:00"), "Asia/Kolkata")  # UTC+5:30
    assert wid == "2026-12-07"
    assert resets == ts("2026-12-07T18:30:00+00:00")


def test_a_month_ends_on_the_first_of_the_next_month_even_in_december() -> None:
    wid, resets = window(MONTH, ts("2026-12-31T23:59:00+00:00"), "UTC")
    assert (wid, resets) == ("2026-12", ts("2027-01-01T00:00:00+00:00"))


def test_dollars_become_micro_dollars_rounded_up() -> None:
    assert usd_units(Decimal("0.05")) == 50_000
    assert usd_units(Decimal("0.0000001")) == 1


# --- reservations (in process) ---------------------------------------------------------------


def reserve(limiter: Limiter, spec: LimitSpec, estimate: Estimate, *, now: float, lease: str = ""):
    meters = spec_meters(spec, estimate, now=now, zone="UTC")
    leases = [x for x in (spec_lease(spec),) if x is not None]
    return asyncio.run(
        limiter.reserve(meters, leases, lease_id=lease or uuid.uuid4().hex, lease_until=now + 60)
    )


@pytest.fixture(params=["memory", "redis"])
def limiter(request: pytest.FixtureRequest) -> Iterator[Limiter]:
    if request.param == "memory":
        yield MemoryLimiter()
        return
    if not redis_available():
        pytest.skip("Redis is not reachable")
    redis_limiter = RedisLimiter(REDIS_TEST_URL, prefix=f"test-lim-{uuid.uuid4().hex[:8]}:")
    yield redis_limiter
    redis_limiter.clear()
    redis_limiter.close()


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The limiters' `time.time()`: what windows and leases are measured against."""
    # 10 s into the coming minute, taken when the test starts: real Redis expires keys by the
    # real clock, so a clock in the past (a fixed date) would see counters and leases vanish.
    now = [float((int(time.time()) // 60 + 1) * 60 + 10)]
    monkeypatch.setattr("keys.limits.time.time", lambda: now[0])
    return now


def test_a_request_limit_admits_exactly_its_limit_in_a_minute(limiter, clock) -> None:
    spec = LimitSpec(id=1, client="app", requests_per_minute=3)
    answers = [reserve(limiter, spec, Estimate(), now=clock[0]).allowed for _ in range(5)]
    assert answers == [True, True, True, False, False]


def test_the_next_minute_has_room_again(limiter, clock) -> None:
    spec = LimitSpec(id=1, client="app", requests_per_minute=1)
    assert reserve(limiter, spec, Estimate(), now=clock[0]).allowed
    refused = reserve(limiter, spec, Estimate(), now=clock[0])
    assert not refused.allowed
    assert refused.retry_after(clock[0]) == pytest.approx(50.0)  # 12:00:10 -> 12:01:00
    clock[0] += 50
    assert reserve(limiter, spec, Estimate(), now=clock[0]).allowed


def test_a_refused_reservation_takes_nothing_from_any_limit(limiter, clock) -> None:
    # Room for requests, none for tokens: the request counter must not move either.
    spec = LimitSpec(id=1, client="app", requests_per_minute=10, tokens_per_minute=100)
    assert reserve(limiter, spec, Estimate(tokens=80), now=clock[0]).allowed
    refused = reserve(limiter, spec, Estimate(tokens=30), now=clock[0])
    assert not refused.allowed
    assert refused.blocked is not None and refused.blocked.kind == TOKENS
    meters = spec_meters(spec, Estimate(), now=clock[0], zone="UTC")
    reading = limiter.read([m.key for m in meters], [], now=clock[0])
    assert reading.used == (1, 80)


def test_a_concurrency_slot_comes_back_when_released(limiter, clock) -> None:
    spec = LimitSpec(id=2, client="app", max_concurrent=1)
    first = reserve(limiter, spec, Estimate(), now=clock[0], lease="a")
    assert first.allowed and first.inflight == (1,)
    assert not reserve(limiter, spec, Estimate(), now=clock[0], lease="b").allowed
    asyncio.run(limiter.release([f"{spec.scope}:inflight"], "a"))
    assert reserve(limiter, spec, Estimate(), now=clock[0], lease="c").allowed


def test_a_slot_given_back_soon_is_free_for_the_next_reservation_or_after_a_moment(
    limiter, clock
) -> None:
    """The request path gives slots back with `release_soon`: the Redis limiter carries the
    release with the process's next reservation (one round trip for both), or sends it on its
    own a few milliseconds later when none comes."""
    spec = LimitSpec(id=2, client="app", max_concurrent=1)
    [lease] = [x for x in (spec_lease(spec),) if x is not None]

    async def scenario() -> None:
        async def take(lease_id: str) -> bool:
            decision = await limiter.reserve(
                [], [lease], lease_id=lease_id, lease_until=clock[0] + 60
            )
            return decision.allowed

        assert await take("a")
        limiter.release_soon([lease.key], "a")
        assert await take("b")  # "a"'s slot was free: its release went first
        limiter.release_soon([lease.key], "b")
        deadline = asyncio.get_running_loop().time() + 2
        while limiter.read([], [lease.key], now=clock[0]).inflight != (0,):
            assert asyncio.get_running_loop().time() < deadline, "the release was never sent"
            await asyncio.sleep(0.002)

    asyncio.run(scenario())


def test_a_slot_a_dead_process_held_lapses_at_its_expiry(limiter, clock) -> None:
    spec = LimitSpec(id=2, client="app", max_concurrent=1)
    assert reserve(limiter, spec, Estimate(), now=clock[0], lease="crashed").allowed
    clock[0] += 61  # lease_until was now + 60; never released
    assert reserve(limiter, spec, Estimate(), now=clock[0], lease="next").allowed


def test_settling_replaces_the_estimate_with_what_was_used(limiter, clock) -> None:
    spec = LimitSpec(id=3, client="app", tokens_per_minute=1000, tokens_per_day=5000)
    decision = reserve(limiter, spec, Estimate(tokens=600), now=clock[0])
    assert decision.used == (600, 600)
    reservation = Reservation(decision=decision)
    # Two records of the request: a failed-over attempt (nothing used), then the final one.
    limiter.settle(reservation.settlements(tokens=0, usd=None, final=False))
    values = limiter.settle(reservation.settlements(tokens=150, usd=None, final=True))
    assert values == [150, 150]
    meters = spec_meters(spec, Estimate(), now=clock[0], zone="UTC")
    assert limiter.read([m.key for m in meters], [], now=clock[0]).used == (150, 150)


def test_a_budget_settles_from_the_cost_and_refuses_once_spent(limiter, clock) -> None:
    spec = LimitSpec(id=4, client="app", usd_per_day=Decimal("0.05"))
    first = reserve(limiter, spec, Estimate(usd=30_000), now=clock[0])
    assert first.allowed
    limiter.settle(Reservation(first).settlements(tokens=0, usd=40_000, final=True))
    refused = reserve(limiter, spec, Estimate(usd=20_000), now=clock[0])
    assert not refused.allowed and refused.blocked is not None
    assert refused.blocked.kind == USD and refused.used == (40_000,)


def test_settling_a_window_that_is_gone_recreates_nothing(limiter, clock) -> None:
    spec = LimitSpec(id=5, client="app", tokens_per_minute=100)
    decision = reserve(limiter, spec, Estimate(tokens=10), now=clock[0])
    limiter.clear()
    assert limiter.settle(Reservation(decision).settlements(tokens=5, usd=None, final=True)) == [
        None
    ]
    meters = spec_meters(spec, Estimate(), now=clock[0], zone="UTC")
    assert limiter.read([m.key for m in meters], [], now=clock[0]).used == (0,)


def test_meters_of_a_spec_cover_each_limit_set(clock) -> None:
    spec = LimitSpec(
        id=6,
        client="app",
        requests_per_minute=1,
        requests_per_day=2,
        tokens_per_minute=3,
        tokens_per_day=4,
        usd_per_day=Decimal(1),
        usd_per_month=Decimal(2),
    )
    meters = spec_meters(spec, Estimate(tokens=7, usd=9), now=clock[0], zone="UTC")
    assert [(m.kind, m.period, m.limit, m.amount) for m in meters] == [
        (REQUESTS, MINUTE, 1, 1),
        (REQUESTS, DAY, 2, 1),
        (TOKENS, MINUTE, 3, 7),
        (TOKENS, DAY, 4, 7),
        (USD, DAY, 1_000_000, 9),
        (USD, MONTH, 2_000_000, 9),
    ]


# --- budget alerts -----------------------------------------------------------------------


def test_each_budget_share_is_announced_once_per_window(limiter, clock, settings) -> None:
    settings.LLMROTATE_BUDGET_ALERT_PERCENTS = [50, 80, 100]
    spec = LimitSpec(id=7, client="app", usd_per_day=Decimal(1))
    [meter] = spec_meters(spec, Estimate(), now=clock[0], zone="UTC")
    seen: list[int] = []

    def receiver(sender: object, percent: int, **_: object) -> None:
        seen.append(percent)

    budget_threshold_reached.connect(receiver)
    try:
        budget_check(limiter, meter, 400_000)  # 40%: nothing
        budget_check(limiter, meter, 850_000)  # 50% and 80%
        budget_check(limiter, meter, 900_000)  # nothing new
        budget_check(limiter, meter, 990_000, refused=True)  # a refusal: as good as spent
    finally:
        budget_threshold_reached.disconnect(receiver)
    assert seen == [50, 80, 100]


def test_a_redis_that_never_answers_costs_one_bounded_wait_then_none(clock) -> None:
    """A listener that accepts connections and never answers (a hung Redis): the reservation
    gives up within its timeout (error set, nothing reserved), and the next ones skip Redis."""
    import socket
    import threading
    import time as real_time

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.05)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    port = listener.getsockname()[1]
    hung = RedisLimiter(f"redis://127.0.0.1:{port}/0", prefix="hung:", timeout=0.1)
    spec = LimitSpec(id=9, client="app", requests_per_minute=5)
    try:
        started = real_time.monotonic()
        first = reserve(hung, spec, Estimate(), now=clock[0])
        waited = real_time.monotonic() - started
        connections = len(held)
        second = reserve(hung, spec, Estimate(), now=clock[0])
    finally:
        stop.set()
        thread.join(2)
        for conn in held:
            conn.close()
        listener.close()
        hung.close()
    assert first.error and not first.allowed
    assert second.error
    # Bounded by the timeout (0.1 s), not by the client's retries or a socket that never
    # answers; generous margins: this proves "bounded", the benchmark measures the cost.
    assert waited < 1.0
    # The second one did not go to Redis at all: the outage was noted, no connection opened.
    assert hung._outage_watch.down
    assert len(held) == connections
