"""Scheduled re-validation: quarantined and exhausted keys come back through one cheap
authenticated call (GET /models), never on a timer alone after an auth failure. Scaled out the
Celery task does it; embedded, a loop in the web process, on the same beat entry's switch and
interval."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Iterator
from unittest import mock

import httpx
import pytest
from asgiref.sync import sync_to_async
from django.db import connections
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from healthchecks.key_recheck import keys_revalidate, keys_revalidate_forever
from keys.health import CallResult, KeyPolicy, KeyStatus, Outcome
from keys.routing import routing_snapshot_sync
from keys.state_store import get_key_state_store
from llmrotate_site.beat import (
    KEYS_REVALIDATE_ENTRY,
    beat_entry_schedule,
    beat_schedule_sync,
    keys_revalidation_schedule,
)
from tests.proxy.conftest import SECRETS, Gateway

# tests/proxy/conftest.py: provider "openai" waits 300 s in quarantine.
POLICY = KeyPolicy(quarantine_seconds=300)


class ModelsEndpoint:
    """GET /models answers per key: 200 for `valid` secrets, 401 for the rest."""

    def __init__(self) -> None:
        self.valid: set[str] = set()
        self.calls: list[tuple[str, str]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        secret = request.headers["authorization"].removeprefix("Bearer ")
        self.calls.append((request.url.path, secret))
        if secret in self.valid:
            return httpx.Response(200, json={"object": "list", "data": []})
        return httpx.Response(401, json={"error": {"code": "invalid_api_key"}})


@pytest.fixture
def models(gateway: Gateway, mock_upstream: Callable[..., None]) -> ModelsEndpoint:
    handler = ModelsEndpoint()
    mock_upstream(handler)
    return handler


def status(key_id: str, now: float) -> KeyStatus:
    state, _ = get_key_state_store().get_many([key_id], now=now)[key_id]
    return state.status


def revalidate(now: float) -> dict[str, bool | None]:
    return asyncio.run(keys_revalidate(snapshot=routing_snapshot_sync(), now=now))


def quarantine(key_id: str, now: float) -> None:
    asyncio.run(
        get_key_state_store().record(
            key_id, CallResult(Outcome.AUTH_FAILED, now=now, policy=POLICY)
        )
    )


def test_an_auth_quarantined_key_comes_back_only_after_revalidation_succeeds(
    models: ModelsEndpoint,
):
    t0 = time.time()
    quarantine("openai-1", t0)
    after_wait = t0 + 301
    # The timer alone does nothing: still quarantined, not available.
    assert status("openai-1", after_wait) == KeyStatus.QUARANTINED
    assert models.calls == []

    # Upstream still rejects the key: the quarantine is extended.
    assert revalidate(after_wait) == {"openai-1": False}
    assert status("openai-1", after_wait) == KeyStatus.QUARANTINED
    assert models.calls == [("/v1/models", SECRETS["k1"])]
    state, _ = get_key_state_store().get_many(["openai-1"], now=after_wait)["openai-1"]
    assert state.quarantine_until > after_wait + 300

    # Not due again until the longer wait is over: nothing is called.
    assert revalidate(after_wait + 1) == {}

    # The key works again: probing, then active after one good live call.
    models.valid.add(SECRETS["k1"])
    later = state.quarantine_until + 1
    assert revalidate(later) == {"openai-1": True}
    assert status("openai-1", later) == KeyStatus.PROBING
    asyncio.run(
        get_key_state_store().record(
            "openai-1", CallResult(Outcome.SUCCESS, now=later + 1, policy=POLICY)
        )
    )
    assert status("openai-1", later + 1) == KeyStatus.ACTIVE


def test_an_exhausted_key_is_revalidated_into_probing(models: ModelsEndpoint):
    now = time.time()
    asyncio.run(
        get_key_state_store().record(
            "openai-2", CallResult(Outcome.QUOTA_EXHAUSTED, now=now, policy=POLICY)
        )
    )
    assert status("openai-2", now + 60) == KeyStatus.EXHAUSTED
    models.valid.add(SECRETS["k2"])
    assert revalidate(now + 60) == {"openai-2": True}
    assert status("openai-2", now + 61) == KeyStatus.PROBING
    # A quota error on its trial call sends it straight back.
    asyncio.run(
        get_key_state_store().record(
            "openai-2", CallResult(Outcome.QUOTA_EXHAUSTED, now=now + 62, policy=POLICY)
        )
    )
    assert status("openai-2", now + 63) == KeyStatus.EXHAUSTED


def test_healthy_keys_are_left_alone(models: ModelsEndpoint):
    assert revalidate(time.time()) == {}
    assert models.calls == []


def test_an_unreachable_upstream_is_inconclusive_and_changes_nothing(
    gateway: Gateway, mock_upstream: Callable[..., None]
):
    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused")

    mock_upstream(down)
    now = time.time()
    quarantine("openai-1", now)
    assert revalidate(now + 301) == {"openai-1": None}
    assert status("openai-1", now + 301) == KeyStatus.QUARANTINED


def test_the_celery_task_revalidates_where_key_state_is_shared(models: ModelsEndpoint, settings):
    from healthchecks.tasks import keys_revalidate as task

    quarantine("openai-1", time.time() - 301)
    models.valid.add(SECRETS["k1"])
    result = task.apply()  # as the worker runs it when beat sends it
    assert result.successful()
    if not settings.REDIS_URL:
        # Embedded: the worker cannot see the web process's key state; the web process runs
        # the re-validation itself (the loop tests below).
        assert result.result == 0 and models.calls == []
        return
    assert result.result == 1 and models.calls == [("/v1/models", SECRETS["k1"])]
    assert status("openai-1", time.time()) == KeyStatus.PROBING


@pytest.fixture
def shared_thread() -> Iterator[None]:
    """The loop reads its beat entry in asgiref's shared thread; close that connection."""
    yield
    asyncio.run(sync_to_async(connections.close_all, thread_sensitive=True)())


def beat_entry(*, enabled: bool, every: int) -> None:
    """The key re-validation entry as an operator leaves it in the admin."""
    beat_schedule_sync()
    interval, _ = IntervalSchedule.objects.get_or_create(
        every=every, period=IntervalSchedule.SECONDS
    )
    PeriodicTask.objects.filter(name=KEYS_REVALIDATE_ENTRY).update(
        enabled=enabled, interval=interval
    )


async def eventually(predicate: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(predicate):
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


async def quarantined_key_that_now_works(models: ModelsEndpoint) -> None:
    store = get_key_state_store()
    await store.record(
        "openai-1", CallResult(Outcome.AUTH_FAILED, now=time.time() - 301, policy=POLICY)
    )
    models.valid.add(SECRETS["k1"])


@pytest.mark.asyncio
async def test_the_web_process_loop_runs_on_the_interval_set_in_the_admin(
    models: ModelsEndpoint, shared_thread: None
):
    await sync_to_async(beat_entry, thread_sensitive=True)(enabled=True, every=1)
    await quarantined_key_that_now_works(models)
    # The argument is what applies before beat has written its entry: an hour, here.
    loop = asyncio.create_task(
        keys_revalidate_forever(
            schedule=functools.partial(keys_revalidation_schedule, default=3600)
        )
    )
    try:
        await eventually(
            lambda: status("openai-1", time.time()) == KeyStatus.PROBING,
            "the key was not re-validated on the entry's 1 s interval",
        )
    finally:
        loop.cancel()
    assert models.calls == [("/v1/models", SECRETS["k1"])]


@pytest.mark.asyncio
async def test_the_web_process_loop_does_nothing_while_the_entry_is_switched_off(
    models: ModelsEndpoint, shared_thread: None
):
    await sync_to_async(beat_entry, thread_sensitive=True)(enabled=False, every=1)
    await quarantined_key_that_now_works(models)
    with mock.patch("llmrotate_site.beat.beat_entry_schedule", wraps=beat_entry_schedule) as read:
        loop = asyncio.create_task(
            keys_revalidate_forever(
                schedule=functools.partial(keys_revalidation_schedule, default=1)
            )
        )
        try:
            # Four reads of the entry: at least one turn came, found it off and passed.
            await eventually(lambda: read.call_count >= 4, "the loop stopped reading its entry")
            assert models.calls == []
            assert status("openai-1", time.time()) == KeyStatus.QUARANTINED

            # Switched back on in the admin: the next turn runs, no restart needed.
            await sync_to_async(beat_entry, thread_sensitive=True)(enabled=True, every=1)
            await eventually(
                lambda: status("openai-1", time.time()) == KeyStatus.PROBING,
                "switching the entry back on did not take effect",
            )
        finally:
            loop.cancel()
