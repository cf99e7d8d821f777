"""The proxy and the breakers: open endpoints are skipped without a try, live traffic trips
them, and half-open lets exactly one request through."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from asgiref.sync import sync_to_async
from django.db import connections
from django.test import AsyncClient

from healthchecks.breaker import BreakerState, BreakerStatus
from healthchecks.gate import get_breaker_gate
from tests.healthchecks.conftest import BACKUP, PRIMARY, open_breaker, stored
from tests.proxy.conftest import Gateway, ok

pytestmark = pytest.mark.asyncio


class ByHost:
    """Upstream answers per host: `down` hosts answer `status` (or raise), others succeed."""

    def __init__(self) -> None:
        self.hosts: list[str] = []
        self.status: dict[str, int] = {}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.hosts.append(request.url.host)
        code = self.status.get(request.url.host)
        if code is None:
            return ok(request)
        if code == 0:
            raise httpx.ConnectError("connection refused")
        return httpx.Response(code, json={"error": {"message": "x", "type": "t", "code": "c"}})


@pytest.fixture
def upstream(gateway: Gateway, mock_upstream: Callable[..., None]) -> ByHost:
    handler = ByHost()
    mock_upstream(handler)
    return handler


@pytest.fixture(autouse=True)
def _close_the_gateway_thread_connection() -> Iterator[None]:
    """The gate and the routing snapshot read the database in asgiref's shared thread; its
    connection must not outlive the test database."""
    yield
    asyncio.run(sync_to_async(connections.close_all, thread_sensitive=True)())


async def post(gateway: Gateway, model: str = "with-fallback") -> Any:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    return await AsyncClient().post(
        "/v1/chat/completions", data=json.dumps(body), content_type="application/json",
        headers=gateway.headers(),
    )  # fmt: skip


def in_thread(fn: Callable[..., Any]) -> Callable[..., Any]:
    # The thread (and database connection) the gateway uses too, closed with the others.
    return sync_to_async(fn, thread_sensitive=True)


async def astored(endpoint: str) -> BreakerState:
    return await in_thread(stored)(endpoint)


async def settled(predicate: Callable[[], bool], timeout: float = 5) -> None:
    """The gate writes to the shared store in the background, after the response."""
    deadline = time.monotonic() + timeout
    while not await in_thread(predicate)():
        assert time.monotonic() < deadline, "the breaker store did not change in time"
        await asyncio.sleep(0.02)


async def test_an_open_endpoint_is_skipped_without_being_tried(gateway, upstream: ByHost):
    await in_thread(open_breaker)(PRIMARY)
    response = await post(gateway)
    assert response.status_code == 200
    assert response["x-llmrotate-attempts"] == "1"
    assert response["x-llmrotate-key"] == "backup-1"
    assert upstream.hosts == ["backup.test"]


async def test_when_every_endpoint_is_open_the_client_gets_503_with_retry_after(
    gateway, upstream: ByHost
):
    await in_thread(open_breaker)(PRIMARY)
    await in_thread(open_breaker)(BACKUP)
    response = await post(gateway)
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "no_key_available" and "circuit open" in error["message"]
    assert 1 <= int(response["Retry-After"]) <= 30  # the open period: 30 s by default
    assert upstream.hosts == []


async def test_failing_live_traffic_trips_the_breaker_and_traffic_moves_on(
    gateway, upstream: ByHost, settings
):
    settings.LLMROTATE_BREAKER_MIN_CALLS = 4
    upstream.status["upstream.test"] = 502
    # Each request fails on both keys of the primary, then the backup answers.
    for _ in range(2):
        assert (await post(gateway)).status_code == 200
    assert upstream.hosts.count("upstream.test") == 4
    await settled(lambda: stored(PRIMARY).status == BreakerStatus.OPEN)
    assert "4 of 4 calls failed" in (await astored(PRIMARY)).reason

    upstream.hosts.clear()
    response = await post(gateway)
    assert response["x-llmrotate-attempts"] == "1" and upstream.hosts == ["backup.test"]


@pytest.mark.parametrize("status", [429, 401, 400])
async def test_answers_that_blame_the_key_or_the_request_do_not_trip_it(
    gateway, upstream: ByHost, settings, status: int
):
    settings.LLMROTATE_BREAKER_MIN_CALLS = 2
    upstream.status["upstream.test"] = status
    for _ in range(3):
        await post(gateway)
    # The gate sees each answer before the response goes out, and would decide a trip then,
    # in this process, before writing it to the store: so this is final, not a race.
    gate = get_breaker_gate()
    calls, failures = gate._windows[PRIMARY].totals(now=time.time())
    # Enough calls seen that counting them as failures would have tripped it; none counted.
    assert calls >= gate.policy.min_calls and failures == 0
    assert (await gate.admit(PRIMARY)).allowed
    assert (await astored(PRIMARY)).status == BreakerStatus.CLOSED


async def test_half_open_sends_one_trial_whose_success_closes_the_breaker(
    gateway, upstream: ByHost
):
    await in_thread(open_breaker)(PRIMARY, open_until=time.time() - 1)
    response = await post(gateway)
    assert response.status_code == 200 and upstream.hosts == ["upstream.test"]
    await settled(lambda: stored(PRIMARY).status == BreakerStatus.CLOSED)
    assert (await astored(PRIMARY)).reason == "trial request succeeded"


async def test_while_the_trial_is_in_flight_other_requests_go_elsewhere(gateway, upstream: ByHost):
    from healthchecks.gate import get_breaker_gate

    await in_thread(open_breaker)(PRIMARY, open_until=time.time() - 1)
    gate = get_breaker_gate()
    first = await gate.admit(PRIMARY)
    assert first.allowed and first.trial
    second = await gate.admit(PRIMARY)
    assert not second.allowed and second.retry_after
    response = await post(gateway)
    assert response["x-llmrotate-key"] == "backup-1" and upstream.hosts == ["backup.test"]


async def test_a_failed_trial_reopens_the_breaker_with_a_longer_wait(gateway, upstream: ByHost):
    upstream.status["upstream.test"] = 0  # connection refused
    await in_thread(open_breaker)(PRIMARY, open_until=time.time() - 1)
    response = await post(gateway)
    assert response.status_code == 200 and response["x-llmrotate-key"] == "backup-1"
    # One trial only: the second key of the primary was not tried after the failure.
    assert upstream.hosts == ["upstream.test", "backup.test"]
    await settled(lambda: stored(PRIMARY).status == BreakerStatus.OPEN)
    state = await astored(PRIMARY)
    assert state.trips == 2 and state.open_until - state.changed_at == pytest.approx(60)


async def test_a_trial_claimed_but_never_sent_is_released(gateway, upstream: ByHost):
    from keys.health import CallResult, KeyPolicy, Outcome
    from keys.state_store import get_key_state_store

    store = get_key_state_store()
    policy = KeyPolicy()
    for key_id in ("openai-1", "openai-2"):
        await store.record(key_id, CallResult(Outcome.AUTH_FAILED, now=time.time(), policy=policy))
    await in_thread(open_breaker)(PRIMARY, open_until=time.time() - 1)
    response = await post(gateway)
    assert response["x-llmrotate-key"] == "backup-1"
    await settled(lambda: stored(PRIMARY).trial_until == 0)
    assert (await astored(PRIMARY)).status == BreakerStatus.HALF_OPEN


async def test_an_endpoint_whose_pings_are_filtered_stays_in_routing(gateway, upstream: ByHost):
    from healthchecks import services
    from healthchecks.models import Endpoint, ProbeStatus
    from healthchecks.probes import ProbeResult

    def probes() -> None:
        services.endpoints_sync()
        endpoint = Endpoint.objects.get(base_url=PRIMARY)
        services.probe_record(endpoint=endpoint, kind="http", result=ProbeResult(ProbeStatus.OK))
        for _ in range(10):
            failed = ProbeResult(ProbeStatus.FAILED, error="no echo reply")
            endpoint = services.probe_record(endpoint=endpoint, kind="ping", result=failed)

    await in_thread(probes)()
    assert (await astored(PRIMARY)).status == BreakerStatus.CLOSED
    response = await post(gateway)
    assert response.status_code == 200 and response["x-llmrotate-attempts"] == "1"
    assert response["x-llmrotate-key"].startswith("openai-")
    assert upstream.hosts == ["upstream.test"]
