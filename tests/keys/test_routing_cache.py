"""The per-process routing snapshot: requests never wait for its periodic reload."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from django.test import override_settings

from keys import routing
from keys.routing import RoutingSnapshot, invalidate_routing_cache, routing_snapshot

pytestmark = pytest.mark.asyncio


@pytest.fixture
def loads(db: None, monkeypatch: pytest.MonkeyPatch) -> list[RoutingSnapshot]:
    """routing_load replaced by one that hands out numbered, empty snapshots."""
    made: list[RoutingSnapshot] = []

    def load() -> RoutingSnapshot:
        made.append(RoutingSnapshot())
        return made[-1]

    monkeypatch.setattr(routing, "routing_load", load)
    return made


def age_by(snapshot: RoutingSnapshot, seconds: float) -> None:
    snapshot.loaded_at = time.monotonic() - seconds


async def wait_for_refresh() -> None:
    assert routing._refresh is not None
    await routing._refresh


async def test_a_stale_snapshot_is_served_while_it_reloads_in_the_background(loads, monkeypatch):
    first = await routing_snapshot()
    release = threading.Event()

    def slow_load() -> RoutingSnapshot:
        assert release.wait(10)
        loads.append(RoutingSnapshot())
        return loads[-1]

    monkeypatch.setattr(routing, "routing_load", slow_load)
    age_by(first, 15)
    with override_settings(LLMROTATE_CONFIG_CACHE_SECONDS=10):
        # The reload is blocked, yet the request gets an answer at once: the old snapshot.
        assert await asyncio.wait_for(routing_snapshot(), timeout=2) is first
        assert await asyncio.wait_for(routing_snapshot(), timeout=2) is first
        release.set()
        await wait_for_refresh()
    assert len(loads) == 2, "two requests on a stale snapshot started one reload"
    assert await routing_snapshot() is loads[-1]


async def test_a_reload_that_a_local_write_overtook_is_dropped(loads, monkeypatch):
    age_by(await routing_snapshot(), 15)
    release = threading.Event()

    def slow_load() -> RoutingSnapshot:
        assert release.wait(10)
        return RoutingSnapshot()

    monkeypatch.setattr(routing, "routing_load", slow_load)
    with override_settings(LLMROTATE_CONFIG_CACHE_SECONDS=10):
        await routing_snapshot()  # starts the background reload
    invalidate_routing_cache()  # an admin write lands while it runs
    release.set()
    await wait_for_refresh()
    assert routing._snapshot is None, "the reload may predate the write; it must not be kept"


async def test_without_a_snapshot_the_request_waits_for_the_load(loads):
    invalidate_routing_cache()
    snapshot = await routing_snapshot()
    assert snapshot is loads[-1]


async def test_a_snapshot_older_than_two_ttls_is_not_served(loads):
    # A process that sat idle must not answer with hours-old tokens and keys.
    old = await routing_snapshot()
    age_by(old, 25)
    with override_settings(LLMROTATE_CONFIG_CACHE_SECONDS=10):
        current = await routing_snapshot()
    assert current is not old and current is loads[-1]


async def test_with_the_database_down_an_old_snapshot_is_still_served(loads, monkeypatch):
    old = await routing_snapshot()
    age_by(old, 25)

    def database_down() -> RoutingSnapshot:
        raise OSError("database unreachable")

    monkeypatch.setattr(routing, "routing_load", database_down)
    with override_settings(LLMROTATE_CONFIG_CACHE_SECONDS=10):
        assert await routing_snapshot() is old


async def test_a_failed_reload_is_retried_soon_not_taken_as_fresh(loads, monkeypatch, caplog):
    old = await routing_snapshot()
    age_by(old, 15)
    down = True

    def flaky() -> RoutingSnapshot:
        if down:
            raise OSError("database unreachable")
        loads.append(RoutingSnapshot())
        return loads[-1]

    monkeypatch.setattr(routing, "routing_load", flaky)
    with override_settings(LLMROTATE_CONFIG_CACHE_SECONDS=10):
        assert await routing_snapshot() is old
        await wait_for_refresh()
        assert any(r.levelname == "ERROR" for r in caplog.records), "a failed reload is loud"
        down = False
        # Within the retry delay, not a whole TTL (10 s) later: the failure did not make the
        # old snapshot look fresh.
        deadline = time.monotonic() + 3 * routing.RETRY_SECONDS + 2
        while (current := await routing_snapshot()) is old:
            assert time.monotonic() < deadline, "the reload was not retried"
            await asyncio.sleep(0.05)
    assert current is loads[-1]
