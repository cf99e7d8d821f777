from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import socket
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis

from keys.health import CallResult, KeyPolicy, KeyStatus, Outcome
from keys.ratelimits import Headroom
from keys.state_store import (
    KeyStateStore,
    MemoryKeyStateStore,
    RedisKeyStateStore,
    get_key_state_store,
    reset_key_state_store,
)
from tests.conftest import LEG, REDIS_TEST_URL

# The scaled-out leg's own Redis; the embedded leg uses one if there is one around.
REDIS_URL = os.environ.get("REDIS_URL") or REDIS_TEST_URL
NOW = 1_000_000.0
POLICY = KeyPolicy(jitter_ratio=0.0)


def require_redis() -> None:
    """Skip without Redis, except in the scaled-out leg: it exists to test Redis."""
    try:
        if redis.Redis.from_url(REDIS_URL, socket_connect_timeout=0.5).ping():
            return
    except redis.exceptions.RedisError:
        pass
    message = f"Redis is not reachable at {REDIS_URL}"
    if LEG == "scaled":
        pytest.fail(message)
    pytest.skip(message)


def unique_prefix() -> str:
    return f"llmrotate-test:{uuid.uuid4().hex}:"


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again on exit: nothing listens there


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[KeyStateStore]:
    if request.param == "memory":
        backend: KeyStateStore = MemoryKeyStateStore()
    else:
        require_redis()
        backend = RedisKeyStateStore(REDIS_URL, prefix=unique_prefix())
    yield backend
    backend.clear()
    if isinstance(backend, RedisKeyStateStore):
        await backend.aclose()  # async: the client must close on the loop it ran on
        backend.close()


async def test_a_new_key_is_active_with_nothing_in_flight(store: KeyStateStore) -> None:
    snap = await store.snapshot(["k1", "k2"], now=NOW)
    assert set(snap) == {"k1", "k2"}
    state, inflight = snap["k1"]
    assert state.status == KeyStatus.ACTIVE
    assert inflight == 0


async def test_it_records_a_429_and_reports_the_cooldown(store: KeyStateStore) -> None:
    new = await store.record(
        "k", CallResult(Outcome.RATE_LIMITED, now=NOW, policy=POLICY, retry_after=30)
    )
    assert new.status == KeyStatus.COOLDOWN
    state, _ = (await store.snapshot(["k"], now=NOW + 1))["k"]
    assert state.status == KeyStatus.COOLDOWN
    assert state.cooldown_until == NOW + 30
    assert store.get_many(["k"], now=NOW + 1)["k"][0] == state
    # Expiry is lazy: nothing has to run for the key to come back.
    assert (await store.snapshot(["k"], now=NOW + 31))["k"][0].status == KeyStatus.ACTIVE


async def test_timers_only_move_forward(store: KeyStateStore) -> None:
    await store.record(
        "k", CallResult(Outcome.RATE_LIMITED, now=NOW, policy=POLICY, retry_after=100)
    )
    await store.record(
        "k", CallResult(Outcome.RATE_LIMITED, now=NOW + 1, policy=POLICY, retry_after=2)
    )
    state, _ = store.get_many(["k"], now=NOW + 2)["k"]
    assert state.cooldown_until == NOW + 100


async def test_a_late_success_keeps_the_cooldown_but_is_counted(store: KeyStateStore) -> None:
    await store.record(
        "k", CallResult(Outcome.RATE_LIMITED, now=NOW, policy=POLICY, retry_after=60)
    )
    headroom = Headroom(remaining_requests=0, remaining_tokens=10, limit_tokens=1000)
    await store.record(
        "k", CallResult(Outcome.SUCCESS, now=NOW + 1, policy=POLICY, headroom=headroom)
    )
    state, _ = store.get_many(["k"], now=NOW + 2)["k"]
    assert state.status == KeyStatus.COOLDOWN
    assert state.cooldown_until == NOW + 60
    assert (state.total_successes, state.total_failures) == (1, 1)
    assert (state.remaining_requests, state.remaining_tokens) == (0, 10)
    assert (state.limit_requests, state.limit_tokens) == (None, 1000)
    assert state.last_used_at == NOW + 1


async def test_successes_reset_a_run_of_failures(store: KeyStateStore) -> None:
    await store.record("k", CallResult(Outcome.UPSTREAM_ERROR, now=NOW, policy=POLICY))
    await store.record("k", CallResult(Outcome.UPSTREAM_ERROR, now=NOW, policy=POLICY))
    await store.record("k", CallResult(Outcome.SUCCESS, now=NOW, policy=POLICY))
    for _ in range(5):
        await store.record("k", CallResult(Outcome.SUCCESS, now=NOW, policy=POLICY))
    state, _ = store.get_many(["k"], now=NOW)["k"]
    assert state.consecutive_failures == 0
    assert (state.total_successes, state.total_failures) == (6, 2)


async def test_concurrent_records_lose_no_update(store: KeyStateStore) -> None:
    calls = [
        store.record("k", CallResult(outcome, now=NOW + i, policy=POLICY, retry_after=i + 1))
        for i in range(40)
        for outcome in (Outcome.RATE_LIMITED, Outcome.SUCCESS, Outcome.UPSTREAM_ERROR)
    ]
    await asyncio.gather(*calls)
    state, _ = store.get_many(["k"], now=NOW)["k"]
    assert state.total_successes == 40
    assert state.total_failures == 80
    assert state.cooldown_until == NOW + 39 + 40


async def test_acquire_counts_calls_in_flight(store: KeyStateStore) -> None:
    assert await store.acquire("k", now=NOW)
    assert await store.acquire("k", now=NOW)
    assert (await store.snapshot(["k"], now=NOW))["k"][1] == 2
    await store.release("k")
    await store.release("k")
    await store.release("k")  # one too many: must not go negative
    assert (await store.snapshot(["k"], now=NOW))["k"][1] == 0
    assert await store.acquire("k", now=NOW)
    assert store.get_many(["k"], now=NOW)["k"][1] == 1


async def test_acquire_refuses_a_benched_key(store: KeyStateStore) -> None:
    await store.record(
        "k", CallResult(Outcome.RATE_LIMITED, now=NOW, policy=POLICY, retry_after=30)
    )
    assert not await store.acquire("k", now=NOW + 1)
    assert await store.acquire("k", now=NOW + 31)


async def test_a_probing_key_allows_one_trial_at_a_time(store: KeyStateStore) -> None:
    await store.record("k", CallResult(Outcome.QUOTA_EXHAUSTED, now=NOW, policy=POLICY))
    later = NOW + POLICY.exhausted_seconds + 1
    assert (await store.snapshot(["k"], now=later))["k"][0].status == KeyStatus.PROBING
    assert await store.acquire("k", now=later)
    assert not await store.acquire("k", now=later)  # the trial is already in flight
    await store.release("k")
    assert await store.acquire("k", now=later)  # the trial ended without a verdict: try again
    await store.record("k", CallResult(Outcome.SUCCESS, now=later, policy=POLICY))
    await store.release("k")
    assert (await store.snapshot(["k"], now=later))["k"][0].status == KeyStatus.ACTIVE
    assert await store.acquire("k", now=later)
    assert await store.acquire("k", now=later)


async def test_round_robin_counters_increase_per_name(store: KeyStateStore) -> None:
    assert [await store.next_rr("route-a") for _ in range(3)] == [1, 2, 3]
    assert await store.next_rr("route-b") == 1


def test_manual_actions_disable_and_enable_a_key(store: KeyStateStore) -> None:
    assert store.manual("k", "disable", now=NOW).status == KeyStatus.DISABLED
    assert store.get_many(["k"], now=NOW + 10**6)["k"][0].status == KeyStatus.DISABLED
    assert store.manual("k", "enable", now=NOW).status == KeyStatus.ACTIVE
    assert store.get_many(["k"], now=NOW)["k"][0].status == KeyStatus.ACTIVE


async def test_a_recheck_brings_a_quarantined_key_back_to_probing(store: KeyStateStore) -> None:
    await store.record("k", CallResult(Outcome.AUTH_FAILED, now=NOW, policy=POLICY))
    later = NOW + POLICY.quarantine_seconds + 1
    assert not await store.acquire("k", now=later)
    assert store.recheck("k", ok=True, now=later, policy=POLICY).status == KeyStatus.PROBING
    assert await store.acquire("k", now=later)


def test_clear_forgets_everything(store: KeyStateStore) -> None:
    store.manual("k", "disable", now=NOW)
    store.clear()
    assert store.get_many(["k"], now=NOW)["k"][0].status == KeyStatus.ACTIVE


def test_clear_only_touches_its_own_prefix() -> None:
    require_redis()
    mine = RedisKeyStateStore(REDIS_URL, prefix=unique_prefix())
    other = RedisKeyStateStore(REDIS_URL, prefix=unique_prefix())
    try:
        mine.manual("k", "disable", now=NOW)
        other.manual("k", "disable", now=NOW)
        mine.clear()
        assert other.get_many(["k"], now=NOW)["k"][0].status == KeyStatus.DISABLED
    finally:
        other.clear()
        mine.close()
        other.close()


# ---- two OS processes, one Redis


def _retry_after(worker: int, i: int) -> float:
    return float((i * 7 + worker * 13) % 50 + 1)


def _hammer(prefix: str, worker: int, rounds: int, barrier: Any) -> None:
    store = RedisKeyStateStore(REDIS_URL, prefix=prefix)

    async def main() -> None:
        barrier.wait(timeout=60)  # start together, so the two really overlap
        for i in range(rounds):
            now = NOW + i
            retry = _retry_after(worker, i)
            limited = CallResult(Outcome.RATE_LIMITED, now=now, policy=POLICY, retry_after=retry)
            await store.record("shared", limited)
            await store.record("shared", CallResult(Outcome.SUCCESS, now=now, policy=POLICY))
            await store.acquire("counted", now=now)
            await store.next_rr("race")

        await store.aclose()

    asyncio.run(main())


def test_two_processes_hammering_one_key_lose_no_update() -> None:
    require_redis()
    prefix, rounds = unique_prefix(), 300
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_hammer, args=(prefix, w, rounds, barrier)) for w in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]

    store = RedisKeyStateStore(REDIS_URL, prefix=prefix)
    try:
        state, _ = store.get_many(["shared"], now=NOW)["shared"]
        assert state.total_failures == 2 * rounds
        assert state.total_successes == 2 * rounds
        expected = max(NOW + i + _retry_after(w, i) for w in (1, 2) for i in range(rounds))
        assert state.cooldown_until == expected
        assert store.get_many(["counted"], now=NOW)["counted"][1] == 2 * rounds

        async def next_rr() -> int:
            value = await store.next_rr("race")
            await store.aclose()
            return value

        assert asyncio.run(next_rr()) == 2 * rounds + 1
    finally:
        store.clear()
        store.close()


# ---- Redis outage


async def test_a_redis_outage_falls_back_without_raising(caplog: pytest.LogCaptureFixture) -> None:
    store = RedisKeyStateStore(f"redis://:hunter2@127.0.0.1:{unused_port()}/15", prefix="x:")
    with caplog.at_level(logging.WARNING, logger="llmrotate.keys"):
        await store.record(
            "k", CallResult(Outcome.RATE_LIMITED, now=NOW, policy=POLICY, retry_after=30)
        )
        state, inflight = (await store.snapshot(["k"], now=NOW + 1))["k"]
        assert state.status == KeyStatus.COOLDOWN  # the fallback remembers, in this process
        assert inflight == 0
        assert not await store.acquire("k", now=NOW + 1)
        assert await store.acquire("other", now=NOW + 1)
        await store.release("other")
        assert await store.next_rr("r") == 1
        assert store.manual("k", "reset", now=NOW).status == KeyStatus.ACTIVE
        assert store.recheck("k", ok=False, now=NOW, policy=POLICY).status == (
            KeyStatus.QUARANTINED
        )
        assert store.get_many(["k"], now=NOW)["k"][0].status == KeyStatus.QUARANTINED
        store.clear()
    warnings = [r for r in caplog.records if r.name == "llmrotate.keys"]
    assert len(warnings) == 1  # rate-limited, not one per call
    assert "unavailable" in warnings[0].getMessage()
    assert "hunter2" not in warnings[0].getMessage()
    await store.aclose()
    store.close()


def test_a_redis_outage_in_sync_calls_falls_back_too() -> None:
    store = RedisKeyStateStore(f"redis://127.0.0.1:{unused_port()}/15", prefix="x:")
    assert store.manual("k", "disable", now=NOW).status == KeyStatus.DISABLED
    assert store.get_many(["k"], now=NOW)["k"][0].status == KeyStatus.DISABLED
    store.close()


# ---- the process-wide store


def test_the_process_store_follows_the_redis_url_setting() -> None:
    from django.conf import settings
    from django.core.exceptions import ImproperlyConfigured
    from django.test import override_settings

    try:
        settings.REDIS_URL  # noqa: B018 (touching it configures settings)
    except ImproperlyConfigured:
        pytest.skip("Django settings are not configured in this run")
    try:
        with override_settings(REDIS_URL=""):
            reset_key_state_store()
            assert isinstance(get_key_state_store(), MemoryKeyStateStore)
            assert get_key_state_store() is get_key_state_store()
        with override_settings(REDIS_URL=REDIS_URL, LLMROTATE_REDIS_PREFIX=unique_prefix()):
            reset_key_state_store()
            assert isinstance(get_key_state_store(), RedisKeyStateStore)
    finally:
        reset_key_state_store()


async def test_a_dead_process_calls_in_flight_stop_counting() -> None:
    """A worker killed outright never releases its calls. Its counts are its own (one field
    per process) and count only while it is alive: once it has been silent for
    PROCESS_ALIVE_SECONDS the others no longer see them in flight (tests/chaos found the
    single shared counter stuck at 1 after a SIGKILL)."""
    import keys.state_store_redis as redis_store

    require_redis()
    prefix = unique_prefix()
    survivor = RedisKeyStateStore(REDIS_URL, prefix=prefix)
    victim = RedisKeyStateStore(REDIS_URL, prefix=prefix)
    victim._process = (os.getpid(), "victim-host:4242:dead")  # another process, as seen by Redis
    try:
        assert await victim.acquire("k", now=NOW)
        assert await survivor.acquire("k", now=NOW)
        assert (await survivor.snapshot(["k"], now=NOW))["k"][1] == 2
        assert survivor.get_many(["k"], now=NOW)["k"][1] == 2
        # The victim dies without a release; its heartbeat grows old.
        redis.Redis.from_url(REDIS_URL).zadd(f"{prefix}procs", {"victim-host:4242:dead": 1.0})
        assert (await survivor.snapshot(["k"], now=NOW))["k"][1] == 1
        await survivor.release("k")
        assert survivor.get_many(["k"], now=NOW)["k"][1] == 0
        assert redis_store.PROCESS_ALIVE_SECONDS > 2 * redis_store._HEARTBEAT_SECONDS
    finally:
        survivor.clear()
        for backend in (survivor, victim):
            await backend.aclose()
            backend.close()


async def test_counters_left_by_an_earlier_version_do_not_break_the_store() -> None:
    """Earlier versions kept calls in flight in a string `inflight:<key>`; a hash under that
    name would fail every command (WRONGTYPE) and send the store to its fallback for good."""
    require_redis()
    prefix = unique_prefix()
    redis.Redis.from_url(REDIS_URL).set(f"{prefix}inflight:k", "0")
    store = RedisKeyStateStore(REDIS_URL, prefix=prefix)
    try:
        assert await store.acquire("k", now=NOW)
        assert (await store.snapshot(["k"], now=NOW))["k"][1] == 1
        await store.release("k")
        assert store.get_many(["k"], now=NOW)["k"][1] == 0
        assert not store._outage_watch.down
    finally:
        store.clear()
        await store.aclose()
        store.close()
