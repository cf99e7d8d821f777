"""GET /internal/health and GET /api/health/endpoints (GET /healthz: tests/llmrotate_site)."""

from __future__ import annotations

import json

import pytest
from django.test import Client

from healthchecks import services
from healthchecks.models import Endpoint, ProbeStatus
from healthchecks.probes import ProbeResult
from tests.factories import ApiKeyFactory, ClientTokenFactory, ProviderFactory
from tests.healthchecks.conftest import open_breaker

pytestmark = pytest.mark.django_db


@pytest.fixture
def two_endpoints() -> tuple[Endpoint, Endpoint]:
    ProviderFactory(name="good", base_url="https://good.example.test/v1")
    bad = ProviderFactory(name="bad", base_url="https://user:hunter22@bad.example.test/v1?key=s3")
    ApiKeyFactory(provider=bad, raw_secret="sk-live-secret-value-0123456789")
    services.endpoints_sync()
    good_ep = Endpoint.objects.get(base_url__contains="good")
    bad_ep = Endpoint.objects.get(base_url__contains="bad")
    services.probe_record(
        endpoint=good_ep, kind="http", result=ProbeResult(ProbeStatus.OK, latency_ms=8.0)
    )
    for _ in range(2):
        services.probe_record(
            endpoint=bad_ep, kind="http", result=ProbeResult(ProbeStatus.FAILED, error="HTTP 503")
        )
    return good_ep, bad_ep


def test_internal_health_lists_each_endpoint_with_probes_breaker_and_a_summary(
    client: Client, two_endpoints: tuple[Endpoint, Endpoint]
):
    response = client.get("/internal/health")
    assert response.status_code == 200
    body = response.json()
    assert body["summary"] == {"total": 2, "healthy": 1, "unhealthy": 1}
    good = body["endpoint_health"]["https://good.example.test/v1"]
    assert good["healthy"] is True and good["breaker_state"] == "closed"
    assert good["http_status"] == "ok" and good["ping_status"] == "unknown"
    assert good["last_latency_ms"] == 8.0
    bad = body["endpoint_health"]["https://***@bad.example.test/v1?key=***"]
    assert bad["healthy"] is False and bad["breaker_state"] == "open"
    assert bad["consecutive_failures"] == {"ping": 0, "http": 2}
    assert bad["breaker_reopens_at"] and bad["last_change"]
    assert bad["providers"] == ["bad"]


def test_endpoint_health_holds_a_summary_with_lip_names_beside_the_endpoints(
    client: Client, two_endpoints: tuple[Endpoint, Endpoint]
):
    # LLM Interactive Proxy's health-checks.md: jq '.endpoint_health.summary.unhealthy_endpoints'
    health = client.get("/internal/health").json()["endpoint_health"]
    assert health["summary"] == {
        "total": 2, "healthy": 1, "unhealthy": 1,
        "total_endpoints": 2, "healthy_endpoints": 1, "unhealthy_endpoints": 1,
    }  # fmt: skip
    assert health["https://good.example.test/v1"]["healthy"] is True


def test_the_summary_counts_no_endpoints_when_there_are_none(client: Client):
    health = client.get("/internal/health").json()["endpoint_health"]
    assert health == {
        "summary": {"total": 0, "healthy": 0, "unhealthy": 0, "total_endpoints": 0,
                    "healthy_endpoints": 0, "unhealthy_endpoints": 0}
    }  # fmt: skip


def test_internal_health_shows_no_credentials_from_base_urls_and_no_keys(
    client: Client, two_endpoints: tuple[Endpoint, Endpoint]
):
    text = client.get("/internal/health").content.decode()
    for secret in ("hunter22", "key=s3", "sk-live-secret-value"):
        assert secret not in text


def test_an_endpoint_never_probed_is_listed_as_unknown_and_healthy(client: Client):
    ProviderFactory(name="new", base_url="https://new.example.test/v1")
    body = client.get("/internal/health").json()
    new = body["endpoint_health"]["https://new.example.test/v1"]
    assert (new["http_status"], new["breaker_state"], new["healthy"]) == ("unknown", "closed", True)


def test_endpoints_that_differ_only_in_what_is_masked_are_each_listed(client: Client):
    ProviderFactory(name="team-a", base_url="https://a:tok3n-a@shared.example.test/v1")
    ProviderFactory(name="team-b", base_url="https://b:tok3n-b@shared.example.test/v1")
    body = client.get("/internal/health").json()
    # Before the worker has created their rows, and after.
    shown = "https://***@shared.example.test/v1"
    assert sorted(body["endpoint_health"]) == [f"{shown}#new-1", f"{shown}#new-2", "summary"]
    services.endpoints_sync()
    team_a = Endpoint.objects.get(base_url__contains="tok3n-a")
    for _ in range(2):
        services.probe_record(
            endpoint=team_a, kind="http", result=ProbeResult(ProbeStatus.FAILED, error="HTTP 503")
        )
    text = client.get("/internal/health").content.decode()
    assert "tok3n" not in text
    health = json.loads(text)["endpoint_health"]
    team_b = Endpoint.objects.get(base_url__contains="tok3n-b")
    assert set(health) == {f"{shown}#{team_a.pk}", f"{shown}#{team_b.pk}", "summary"}
    assert health[f"{shown}#{team_a.pk}"]["providers"] == ["team-a"]
    assert health[f"{shown}#{team_a.pk}"]["healthy"] is False
    assert health[f"{shown}#{team_b.pk}"]["healthy"] is True


def test_the_api_has_the_same_data_behind_monitor_auth(
    client: Client, two_endpoints: tuple[Endpoint, Endpoint]
):
    proxy_only = ClientTokenFactory(scopes=["proxy"])
    monitor = ClientTokenFactory(scopes=["monitor"])
    assert client.get("/api/health/endpoints").status_code == 401
    forbidden = client.get(
        "/api/health/endpoints", headers={"Authorization": f"Bearer {proxy_only.raw_token}"}
    )
    assert forbidden.status_code == 403
    response = client.get(
        "/api/health/endpoints", headers={"Authorization": f"Bearer {monitor.raw_token}"}
    )
    assert response.status_code == 200
    assert response.json() == client.get("/internal/health").json()


def test_the_admin_lists_endpoints_with_their_breaker_and_recent_results(
    admin_client: Client, two_endpoints: tuple[Endpoint, Endpoint]
):
    _, bad = two_endpoints
    listing = admin_client.get("/admin/healthchecks/endpoint/").content.decode()
    assert "open (half-open in" in listing and "closed" in listing
    page = admin_client.get(f"/admin/healthchecks/endpoint/{bad.pk}/change/").content.decode()
    assert "HTTP 503" in page and "all results" in page
    events = admin_client.get(f"/admin/healthchecks/healthevent/?endpoint__id__exact={bad.pk}")
    assert events.status_code == 200 and "HTTP 503" in events.content.decode()


def test_an_operator_can_tune_an_endpoint_and_close_its_breaker(
    admin_client: Client, two_endpoints: tuple[Endpoint, Endpoint]
):
    from healthchecks.breaker_store import get_breaker_store

    _, bad = two_endpoints
    open_breaker(bad.base_url)
    response = admin_client.post(
        "/admin/healthchecks/endpoint/",
        {"action": "reset_breakers", "_selected_action": [bad.pk]},
    )
    assert response.status_code == 302
    assert get_breaker_store().get(bad.base_url).status == "closed"
    form = {
        "enabled": "on", "ping_enabled": "on", "ping_interval_seconds": 10,
        "ping_failure_threshold": 5, "http_enabled": "on", "http_interval_seconds": 15,
        "http_failure_threshold": 1, "http_url": "", "http_expected_status": "200",
        "http_timeout_seconds": 2.5,
    }  # fmt: skip
    saved = admin_client.post(f"/admin/healthchecks/endpoint/{bad.pk}/change/", form)
    assert saved.status_code == 302, saved.content.decode()[:2000]
    bad.refresh_from_db()
    assert (bad.http_interval_seconds, bad.http_failure_threshold) == (15, 1)
    assert bad.http_expected_status == 200
