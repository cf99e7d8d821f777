"""Pings that get no reply while the HTTP probe gets answers (providers that filter ICMP) mark
the endpoint degraded, once; they open its breaker only when the HTTP probe fails too, or when
the endpoint has no HTTP probe."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client

from healthchecks import services
from healthchecks.breaker import BreakerStatus
from healthchecks.models import Endpoint, ProbeStatus
from healthchecks.probes import ProbeResult
from tests.factories import ProviderFactory
from tests.healthchecks.conftest import stored

pytestmark = pytest.mark.django_db

URL = "https://filtered.example.test/v1"
HTTP_OK = ProbeResult(ProbeStatus.OK, latency_ms=80.0, status_code=200)
HTTP_DOWN = ProbeResult(ProbeStatus.FAILED, error="HTTP 503", status_code=503)
NO_REPLY = ProbeResult(ProbeStatus.FAILED, error="no echo reply")
PONG = ProbeResult(ProbeStatus.OK, latency_ms=3.0)


@pytest.fixture
def endpoint() -> Endpoint:
    ProviderFactory(name="filtered", base_url=URL)
    services.endpoints_sync()
    return Endpoint.objects.get()  # ping threshold 3, HTTP threshold 2


def record(endpoint: Endpoint, kind: str, result: ProbeResult, times: int = 1) -> Endpoint:
    for _ in range(times):
        endpoint = services.probe_record(endpoint=endpoint, kind=kind, result=result)
    return endpoint


def events(changes: list[dict[str, Any]]) -> list[str]:
    return [c["event"] for c in changes]


def test_pings_failing_forever_while_http_answers_keep_the_breaker_closed_and_notify_once(
    endpoint: Endpoint, changes: list[dict[str, Any]], client: Client
):
    record(endpoint, "http", HTTP_OK)
    for _ in range(10):  # ten ping intervals' worth, an HTTP probe between every three pings
        endpoint = record(endpoint, "ping", NO_REPLY, times=3)
        assert stored(URL).status == BreakerStatus.CLOSED
        endpoint = record(endpoint, "http", HTTP_OK)
    assert events(changes) == ["endpoint.degraded"]
    assert (changes[0]["previous"], changes[0]["current"]) == ("up", "degraded")
    assert "ping probe failed 3 times in a row" in changes[0]["reason"]

    health = client.get("/internal/health").json()
    item = health["endpoint_health"][URL]
    assert (item["ping_status"], item["http_status"]) == ("failed", "ok")
    assert item["consecutive_failures"] == {"ping": 30, "http": 0}
    assert (item["health"], item["healthy"], item["breaker_state"]) == ("degraded", True, "closed")
    assert health["summary"] == {"total": 1, "healthy": 1, "unhealthy": 0}

    record(endpoint, "ping", PONG)
    assert events(changes) == ["endpoint.degraded", "endpoint.up"]
    assert client.get("/internal/health").json()["endpoint_health"][URL]["health"] == "up"


def test_pings_failing_while_the_http_probe_fails_too_open_the_breaker(
    endpoint: Endpoint, changes: list[dict[str, Any]]
):
    record(endpoint, "http", HTTP_OK)
    endpoint = record(endpoint, "ping", NO_REPLY, times=3)
    assert stored(URL).status == BreakerStatus.CLOSED
    # One HTTP failure, below its own threshold of 2: with the pings down, that is an outage.
    endpoint = record(endpoint, "http", HTTP_DOWN)
    state = stored(URL)
    assert state.status == BreakerStatus.OPEN
    assert "and ping failed 3 times in a row" in state.reason
    assert endpoint.health == "down"
    assert events(changes) == ["endpoint.degraded", "breaker.open", "endpoint.down"]


def test_a_ping_failure_trips_it_too_once_the_http_probe_has_failed(endpoint: Endpoint):
    record(endpoint, "http", HTTP_DOWN)
    record(endpoint, "ping", NO_REPLY, times=2)
    assert stored(URL).status == BreakerStatus.CLOSED
    record(endpoint, "ping", NO_REPLY)
    assert stored(URL).status == BreakerStatus.OPEN
    assert "and the HTTP probe fails too" in stored(URL).reason


def test_without_an_http_probe_failed_pings_alone_open_the_breaker(
    endpoint: Endpoint, changes: list[dict[str, Any]]
):
    Endpoint.objects.update(http_enabled=False)
    endpoint.refresh_from_db()
    endpoint = record(endpoint, "ping", NO_REPLY, times=2)
    assert stored(URL).status == BreakerStatus.CLOSED
    endpoint = record(endpoint, "ping", NO_REPLY)
    assert stored(URL).status == BreakerStatus.OPEN
    assert events(changes) == ["breaker.open", "endpoint.down"]
