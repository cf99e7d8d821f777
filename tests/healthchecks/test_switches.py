"""The operator's switches for health checks: LLMROTATE_HEALTH_CHECKS, LLMROTATE_PING_PROBES,
LLMROTATE_HTTP_PROBES, LLMROTATE_CIRCUIT_BREAKER and LLMROTATE_NOTIFICATIONS.

Probe services are called directly, as the Celery tasks do; the breaker test sends requests
through the proxy with a MockTransport upstream."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import httpx
import pytest
from asgiref.sync import sync_to_async
from django.db import connections
from django.test import AsyncClient

from healthchecks import services
from healthchecks.breaker import BreakerStatus
from healthchecks.gate import reset_breaker_gate
from healthchecks.models import Endpoint, HealthEvent, ProbeStatus
from healthchecks.notify import health_change_notify
from healthchecks.probes import ProbeResult
from healthchecks.selectors import endpoint_health_list
from tests.factories import ProviderFactory
from tests.healthchecks.conftest import (
    PRIMARY,
    WebhookReceiver,
    open_breaker,
    stored,
)
from tests.proxy.conftest import Gateway, ok

OK = ProbeResult(ProbeStatus.OK, latency_ms=12.5, status_code=200)
DOWN = ProbeResult(ProbeStatus.FAILED, error="connection error: ConnectError")

Sent = list[tuple[int, str]]


@pytest.fixture
def endpoint(db: None) -> Endpoint:
    ProviderFactory(name="acme", base_url="https://acme.example.test/v1/")
    services.endpoints_sync()
    return Endpoint.objects.get()


def dispatch() -> Sent:
    sent: Sent = []
    services.probes_dispatch(send=lambda pk, kind: sent.append((pk, kind)))
    return sent


def record(endpoint: Endpoint, kind: str, result: ProbeResult, times: int = 1) -> Endpoint:
    for _ in range(times):
        endpoint = services.probe_record(endpoint=endpoint, kind=kind, result=result)
    return endpoint


def shown(endpoint: Endpoint) -> dict[str, Any]:
    """The endpoint as /internal/health and /api/health show it."""
    (entry,) = [e for e in endpoint_health_list() if e.endpoint_id == endpoint.pk]
    return {
        "health": entry.health.health,
        "healthy": entry.health.healthy,
        "ping": entry.health.ping_status,
        "http": entry.health.http_status,
    }


# ---- LLMROTATE_HEALTH_CHECKS


def test_with_health_checks_off_no_probe_is_dispatched(endpoint: Endpoint, settings):
    settings.LLMROTATE_HEALTH_CHECKS = False
    assert dispatch() == []
    assert dispatch() == []
    endpoint.refresh_from_db()
    assert (endpoint.next_ping_at, endpoint.next_http_at) == (None, None)


def test_with_health_checks_off_a_probe_queued_before_is_not_sent(endpoint: Endpoint, settings):
    settings.LLMROTATE_HEALTH_CHECKS = False
    with (
        mock.patch("healthchecks.services.http_probe", return_value=OK) as http,
        mock.patch("healthchecks.services.ping_probe", return_value=OK) as ping,
    ):
        assert services.endpoint_probe(endpoint_id=endpoint.pk, kind="http") is None
        assert services.endpoint_probe(endpoint_id=endpoint.pk, kind="ping") is None
    http.assert_not_called()
    ping.assert_not_called()
    assert HealthEvent.objects.count() == 0


def test_with_health_checks_off_an_endpoint_shows_unknown_not_its_last_verdict(
    endpoint: Endpoint, settings
):
    endpoint = record(endpoint, "http", DOWN, times=2)
    assert shown(endpoint)["health"] == "down"
    settings.LLMROTATE_HEALTH_CHECKS = False
    dispatch()
    endpoint.refresh_from_db()
    assert shown(endpoint)["health"] == "unknown"
    assert (shown(endpoint)["ping"], shown(endpoint)["http"]) == ("disabled", "disabled")
    assert (endpoint.ping_failures, endpoint.http_failures) == (0, 0)

    settings.LLMROTATE_HEALTH_CHECKS = True
    assert sorted(kind for _, kind in dispatch()) == ["http", "ping"]
    assert (shown(endpoint)["ping"], shown(endpoint)["http"]) == ("unknown", "unknown")


# ---- LLMROTATE_PING_PROBES / LLMROTATE_HTTP_PROBES


def test_with_pings_off_only_http_probes_are_sent(endpoint: Endpoint, settings):
    settings.LLMROTATE_PING_PROBES = False
    assert dispatch() == [(endpoint.pk, "http")]
    with mock.patch("healthchecks.services.ping_probe", return_value=OK) as ping:
        assert services.endpoint_probe(endpoint_id=endpoint.pk, kind="ping") is None
    ping.assert_not_called()


def test_with_http_probes_off_only_pings_are_sent(endpoint: Endpoint, settings):
    settings.LLMROTATE_HTTP_PROBES = False
    assert dispatch() == [(endpoint.pk, "ping")]
    with mock.patch("healthchecks.services.http_probe", return_value=OK) as http:
        assert services.endpoint_probe(endpoint_id=endpoint.pk, kind="http") is None
    http.assert_not_called()


def test_with_pings_off_health_rests_on_the_http_probe(endpoint: Endpoint, settings):
    # Failed pings plus one failed HTTP probe: down (pings count while HTTP fails too).
    endpoint = record(endpoint, "ping", DOWN, times=3)
    endpoint = record(endpoint, "http", DOWN)
    assert shown(endpoint)["health"] == "down"

    settings.LLMROTATE_PING_PROBES = False
    dispatch()
    endpoint.refresh_from_db()
    # One HTTP failure is below its threshold of 2: up on the HTTP probe's word alone (the
    # breaker the pings opened stays open for its period: live traffic or a probe closes it).
    assert shown(endpoint) == {
        "health": "up",
        "healthy": False,
        "ping": "disabled",
        "http": "failed",
    }
    endpoint = record(endpoint, "http", DOWN)
    assert shown(endpoint)["health"] == "down"
    endpoint = record(endpoint, "http", OK)
    assert shown(endpoint)["health"] == "up"


def test_with_http_probes_off_health_rests_on_the_pings(endpoint: Endpoint, settings):
    settings.LLMROTATE_HTTP_PROBES = False
    dispatch()
    endpoint.refresh_from_db()
    # Three failed pings are only `degraded` while an HTTP probe answers; without one, down.
    endpoint = record(endpoint, "ping", DOWN, times=3)
    assert shown(endpoint)["health"] == "down"
    assert shown(endpoint)["http"] == "disabled"
    assert stored(endpoint.base_url).status == BreakerStatus.OPEN
    endpoint = record(endpoint, "ping", OK)
    assert shown(endpoint)["health"] == "up"


def test_with_both_kinds_off_nothing_is_sent_and_health_is_unknown(endpoint: Endpoint, settings):
    endpoint = record(endpoint, "http", OK)
    assert shown(endpoint)["health"] == "up"
    settings.LLMROTATE_PING_PROBES = False
    settings.LLMROTATE_HTTP_PROBES = False
    assert dispatch() == []
    assert shown(endpoint) == {
        "health": "unknown",
        "healthy": True,  # no probe keeps it out of routing: only its breaker does
        "ping": "disabled",
        "http": "disabled",
    }


# ---- LLMROTATE_CIRCUIT_BREAKER


def test_with_the_breaker_off_probes_still_run_and_report_its_state(endpoint: Endpoint, settings):
    settings.LLMROTATE_CIRCUIT_BREAKER = False
    assert sorted(kind for _, kind in dispatch()) == ["http", "ping"]
    endpoint = record(endpoint, "http", DOWN, times=2)
    assert stored(endpoint.base_url).status == BreakerStatus.OPEN
    (entry,) = endpoint_health_list()
    assert entry.health.breaker_state == "open" and entry.health.healthy is False


class CountingUpstream:
    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.hosts: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.hosts.append(request.url.host)
        if self.status == 200:
            return ok(request)
        return httpx.Response(self.status, json={"error": {"message": "x", "type": "t"}})


@pytest.fixture
def upstream(gateway: Gateway, mock_upstream: Callable[..., None]) -> CountingUpstream:
    handler = CountingUpstream()
    mock_upstream(handler)
    return handler


@pytest.fixture
def _close_the_gateway_thread_connection() -> Iterator[None]:
    yield
    asyncio.run(sync_to_async(connections.close_all, thread_sensitive=True)())


async def post(gateway: Gateway) -> Any:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    return await AsyncClient().post(
        "/v1/chat/completions",
        data=json.dumps(body),
        content_type="application/json",
        headers=gateway.headers(),
    )


@pytest.mark.usefixtures("_close_the_gateway_thread_connection")
async def test_with_the_breaker_on_an_open_endpoint_is_not_tried(
    gateway: Gateway, upstream: CountingUpstream
):
    # The control for the test below: the same request, the breaker left on.
    await sync_to_async(open_breaker, thread_sensitive=True)(PRIMARY)
    assert (await post(gateway)).status_code == 503
    assert upstream.hosts == []


@pytest.mark.usefixtures("_close_the_gateway_thread_connection")
async def test_with_the_breaker_off_the_proxy_tries_an_endpoint_whose_breaker_is_open(
    gateway: Gateway, upstream: CountingUpstream, settings
):
    settings.LLMROTATE_CIRCUIT_BREAKER = False
    reset_breaker_gate()  # the gate reads the switch when it is built
    await sync_to_async(open_breaker, thread_sensitive=True)(PRIMARY)
    response = await post(gateway)
    assert response.status_code == 200
    assert upstream.hosts == ["upstream.test"]


@pytest.mark.usefixtures("_close_the_gateway_thread_connection")
async def test_with_the_breaker_off_failing_traffic_trips_nothing(
    gateway: Gateway, upstream: CountingUpstream, settings
):
    settings.LLMROTATE_CIRCUIT_BREAKER = False
    settings.LLMROTATE_BREAKER_MIN_CALLS = 2
    reset_breaker_gate()
    upstream.status = 502
    for _ in range(3):
        await post(gateway)
    assert len(upstream.hosts) >= 4  # enough failures to trip it, were it on
    state = await sync_to_async(stored, thread_sensitive=True)(PRIMARY)
    assert state.status == BreakerStatus.CLOSED


# ---- LLMROTATE_NOTIFICATIONS


@pytest.fixture
def eager_celery() -> Iterator[None]:
    from llmrotate_site.celery import app

    app.conf.task_always_eager = True
    yield
    app.conf.task_always_eager = False


def notify() -> dict[str, Any]:
    return health_change_notify(
        endpoint="https://api.example.test/v1",
        event="endpoint.down",
        previous="up",
        current="down",
        reason="http probe failed 2 times in a row",
    )


def test_with_notifications_on_the_webhook_is_posted(
    webhook_receiver: WebhookReceiver, eager_celery: None, settings
):
    # The control for the tests below.
    settings.LLMROTATE_WEBHOOK_URLS = [webhook_receiver.url]
    notify()
    assert webhook_receiver.events() == ["endpoint.down"]


def test_with_notifications_off_no_webhook_is_posted_but_the_change_is_logged_and_signalled(
    webhook_receiver: WebhookReceiver,
    eager_celery: None,
    changes: list[dict[str, Any]],
    settings,
    caplog,
):
    settings.LLMROTATE_WEBHOOK_URLS = [webhook_receiver.url]
    settings.LLMROTATE_NOTIFICATIONS = False
    with caplog.at_level(logging.WARNING, logger="llmrotate.health"):
        notify()
    assert webhook_receiver.attempts == 0
    assert [c["event"] for c in changes] == ["endpoint.down"]
    assert "endpoint.down" in caplog.text


def test_with_notifications_off_a_webhook_queued_before_is_dropped(
    webhook_receiver: WebhookReceiver, eager_celery: None, settings, caplog
):
    from healthchecks.tasks import webhook_deliver

    settings.LLMROTATE_NOTIFICATIONS = False
    with caplog.at_level(logging.INFO, logger="llmrotate.health"):
        webhook_deliver.delay(url=webhook_receiver.url, body='{"event": "endpoint.down"}')
    assert webhook_receiver.attempts == 0
    assert "notifications are off: webhook to 127.0.0.1" in caplog.text


@pytest.mark.django_db
def test_with_notifications_off_a_probe_that_finds_an_endpoint_down_posts_nothing(
    endpoint: Endpoint,
    webhook_receiver: WebhookReceiver,
    eager_celery: None,
    changes: list[dict[str, Any]],
    settings,
):
    settings.LLMROTATE_WEBHOOK_URLS = [webhook_receiver.url]
    settings.LLMROTATE_NOTIFICATIONS = False
    record(endpoint, "http", DOWN, times=2)
    assert "endpoint.down" in [c["event"] for c in changes]
    assert webhook_receiver.attempts == 0
