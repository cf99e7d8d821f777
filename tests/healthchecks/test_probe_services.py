"""Probe results feed the endpoint state, the breaker and the notifications (no Celery here:
the services are called directly, as the tasks do)."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any
from unittest import mock

import pytest
from django.utils import timezone

from healthchecks import services
from healthchecks.breaker import BreakerStatus
from healthchecks.models import Endpoint, HealthEvent, ProbeStatus
from healthchecks.probes import ProbeResult
from tests.factories import ApiKeyFactory, ProviderFactory
from tests.healthchecks.conftest import open_breaker, stored

pytestmark = pytest.mark.django_db

OK = ProbeResult(ProbeStatus.OK, latency_ms=12.5, status_code=200)
DOWN = ProbeResult(ProbeStatus.FAILED, error="connection error: ConnectError")
NO_ICMP = ProbeResult(ProbeStatus.UNAVAILABLE, error="ICMP sockets are not allowed")


@pytest.fixture
def endpoint() -> Endpoint:
    ProviderFactory(name="acme", base_url="https://acme.example.test/v1/")
    services.endpoints_sync()
    return Endpoint.objects.get()


def record(endpoint: Endpoint, kind: str, result: ProbeResult, times: int = 1) -> Endpoint:
    for _ in range(times):
        endpoint = services.probe_record(endpoint=endpoint, kind=kind, result=result)
    return endpoint


def test_each_provider_base_url_becomes_one_endpoint_with_the_configured_defaults(settings):
    settings.LLMROTATE_HTTP_PROBE_INTERVAL_SECONDS = 7
    ProviderFactory(name="a", base_url="https://shared.example.test/v1")
    ProviderFactory(name="b", base_url="https://shared.example.test/v1/")
    gone = ProviderFactory(name="c", base_url="https://gone.example.test/v1")
    services.endpoints_sync()
    assert sorted(Endpoint.objects.values_list("base_url", flat=True)) == [
        "https://gone.example.test/v1", "https://shared.example.test/v1",
    ]  # fmt: skip
    endpoint = Endpoint.objects.get(base_url="https://shared.example.test/v1")
    assert (endpoint.http_interval_seconds, endpoint.http_failure_threshold) == (7, 2)
    assert (endpoint.ping_interval_seconds, endpoint.ping_failure_threshold) == (30, 3)
    gone.delete()
    services.endpoints_sync()
    assert Endpoint.objects.count() == 1


def test_due_probes_are_sent_once_per_interval(endpoint: Endpoint):
    sent: list[tuple[int, str]] = []
    assert services.probes_dispatch(send=lambda pk, kind: sent.append((pk, kind))) == 2
    assert sorted(sent) == [(endpoint.pk, "http"), (endpoint.pk, "ping")]
    assert services.probes_dispatch(send=lambda pk, kind: sent.append((pk, kind))) == 0
    Endpoint.objects.update(next_http_at=timezone.now() - timedelta(seconds=1))
    assert services.probes_dispatch(send=lambda pk, kind: sent.append((pk, kind))) == 1
    assert sent[-1] == (endpoint.pk, "http")


def test_disabled_probes_and_disabled_providers_are_not_probed(endpoint: Endpoint):
    Endpoint.objects.update(ping_enabled=False)
    sent: list[tuple[int, str]] = []
    services.probes_dispatch(send=lambda pk, kind: sent.append((pk, kind)))
    assert sent == [(endpoint.pk, "http")]
    endpoint.refresh_from_db()
    Endpoint.objects.update(next_http_at=None)
    from keys.models import Provider

    Provider.objects.update(enabled=False)
    assert services.probes_dispatch(send=lambda pk, kind: sent.append((pk, kind))) == 0


def test_http_failures_up_to_the_threshold_open_the_breaker_and_mark_it_down(
    endpoint: Endpoint, changes: list[dict[str, Any]]
):
    endpoint = record(endpoint, "http", OK)
    assert endpoint.is_up is True and changes == []  # first contact, all well: no news
    endpoint = record(endpoint, "http", DOWN)
    assert endpoint.http_failures == 1 and endpoint.is_up is True
    assert stored(endpoint.base_url).status == BreakerStatus.CLOSED
    endpoint = record(endpoint, "http", DOWN)
    assert endpoint.http_failures == 2 and endpoint.is_up is False
    state = stored(endpoint.base_url)
    assert state.status == BreakerStatus.OPEN
    assert "http probe failed 2 times in a row" in state.reason
    assert [c["event"] for c in changes] == ["breaker.open", "endpoint.down"]
    assert changes[0]["endpoint"] == "https://acme.example.test/v1"
    events = HealthEvent.objects.filter(endpoint=endpoint).order_by("id")
    assert [(e.kind, e.ok, e.status) for e in events] == [
        ("http", True, "ok"), ("http", False, "failed"), ("http", False, "failed"),
    ]  # fmt: skip
    assert events[0].latency_ms == 12.5 and events[0].status_code == 200
    assert events[2].error == "connection error: ConnectError"


def test_recovery_goes_through_half_open_to_closed_and_up(
    endpoint: Endpoint, changes: list[dict[str, Any]]
):
    endpoint = record(endpoint, "http", DOWN, times=2)
    open_breaker(endpoint.base_url, open_until=time.time() - 1)  # the open period is over
    changes.clear()
    with mock.patch("healthchecks.services.http_probe", return_value=OK):
        services.endpoint_probe(endpoint_id=endpoint.pk, kind="http")  # the trial
    endpoint.refresh_from_db()
    assert stored(endpoint.base_url).status == BreakerStatus.CLOSED
    assert endpoint.is_up is True and endpoint.http_failures == 0
    assert [c["event"] for c in changes] == [
        "breaker.half_open", "breaker.closed", "endpoint.up",
    ]  # fmt: skip


def test_the_dispatcher_announces_half_open_when_the_open_period_ends(
    endpoint: Endpoint, changes: list[dict[str, Any]]
):
    open_breaker(endpoint.base_url, open_until=time.time() - 1)
    services.probes_dispatch(send=lambda pk, kind: None)
    assert stored(endpoint.base_url).status == BreakerStatus.HALF_OPEN
    assert [c["event"] for c in changes] == ["breaker.half_open"]
    services.probes_dispatch(send=lambda pk, kind: None)
    assert len(changes) == 1


def test_a_ping_success_does_not_close_a_breaker_an_http_probe_guards(endpoint: Endpoint):
    open_breaker(endpoint.base_url, open_until=time.time() - 1)
    with mock.patch("healthchecks.services.ping_probe", return_value=OK):
        services.endpoint_probe(endpoint_id=endpoint.pk, kind="ping")
        assert stored(endpoint.base_url).status == BreakerStatus.HALF_OPEN
        Endpoint.objects.update(http_enabled=False)
        services.endpoint_probe(endpoint_id=endpoint.pk, kind="ping")
    assert stored(endpoint.base_url).status == BreakerStatus.CLOSED


def test_an_unavailable_ping_is_recorded_but_changes_no_health(
    endpoint: Endpoint, changes: list[dict[str, Any]]
):
    endpoint = record(endpoint, "ping", NO_ICMP, times=5)
    assert endpoint.ping_status == ProbeStatus.UNAVAILABLE and endpoint.ping_failures == 0
    assert endpoint.is_up is None and changes == []
    assert stored(endpoint.base_url).status == BreakerStatus.CLOSED
    assert HealthEvent.objects.filter(status="unavailable").count() == 5


def test_the_http_probe_authenticates_with_a_key_of_the_endpoint(settings):
    from fake_upstream import FakeUpstream

    secret = "sk-probe-0123456789abcdefghij"
    with FakeUpstream(allowed_keys={secret}) as fake:
        provider = ProviderFactory(name="fake", base_url=fake.base_url)
        ApiKeyFactory(provider=provider, raw_secret=secret, secret_encrypted="", secret_ref="",
                      key_id="fake-1")  # fmt: skip
        from keys.models import ApiKey
        from keys.services import api_key_save

        api_key_save(api_key=ApiKey.objects.get(key_id="fake-1"), secret=secret)
        services.endpoints_sync()
        endpoint = Endpoint.objects.get()
        result = services.endpoint_probe(endpoint_id=endpoint.pk, kind="http")
        assert result is not None and result.status_code == 200
        assert fake.stats()["requests"].get(secret) == 1
    event = HealthEvent.objects.get()
    assert secret not in event.error


def test_the_ping_probe_asks_for_a_raw_socket_only_as_root(endpoint: Endpoint):
    with mock.patch("healthchecks.services.ping_probe", return_value=OK) as ping:
        with mock.patch("os.geteuid", return_value=1000):
            services.endpoint_probe(endpoint_id=endpoint.pk, kind="ping")
        assert ping.call_args.kwargs == {
            "host": "acme.example.test", "timeout": 2.0, "privileged": False,
        }  # fmt: skip
        with mock.patch("os.geteuid", return_value=0):
            services.endpoint_probe(endpoint_id=endpoint.pk, kind="ping")
        assert ping.call_args.kwargs["privileged"] is True


def test_a_probe_of_an_endpoint_deleted_meanwhile_does_nothing():
    assert services.endpoint_probe(endpoint_id=12345, kind="http") is None


def test_old_probe_results_are_pruned_after_the_retention_period(endpoint: Endpoint, settings):
    settings.LLMROTATE_HEALTH_EVENT_RETENTION_DAYS = 7
    now = timezone.now()
    for age in (1, 6, 8, 30):
        HealthEvent.objects.create(
            endpoint=endpoint, kind="http", ok=True, status="ok",
            created_at=now - timedelta(days=age),
        )  # fmt: skip
    assert services.health_events_prune() == 2
    assert HealthEvent.objects.count() == 2
