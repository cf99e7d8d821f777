"""GET /healthz: the gateway's own liveness, each part named when it fails."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any
from unittest import mock

import pytest
from django.test import Client, override_settings
from django.utils import timezone

from tests.conftest import free_port

pytestmark = pytest.mark.django_db


def test_healthz_reports_each_part_ok_when_all_is_well(client: Client, settings):
    response = client.get("/healthz")
    assert response.status_code == 200
    expected = {"database": "ok", "broker": "ok"} | ({"redis": "ok"} if settings.REDIS_URL else {})
    expected["probes"] = "off"  # no provider yet: nothing to probe
    assert response.json() == {"status": "ok", "checks": expected, "failing": [], "degraded": []}


def test_healthz_names_a_database_failure(client: Client):
    from django.db import OperationalError, connections

    refused = OperationalError("connection to server at 10.0.0.5 failed: Connection refused")
    wrapper = type(connections["default"])  # the check runs in a thread of its own
    with mock.patch.object(wrapper, "ensure_connection", side_effect=refused):
        response = client.get("/healthz")
    assert response.status_code == 503
    body = response.json()
    assert body["failing"] == ["database"]
    assert body["checks"]["database"] == "failed: OperationalError"
    assert body["checks"]["broker"] == "ok"
    assert "10.0.0.5" not in response.content.decode()


def test_healthz_names_a_broker_failure(client: Client, settings, tmp_path):
    from llmrotate_site.celery import app

    if settings.REDIS_URL:  # the broker is Redis: point it at a port nobody listens on
        original = app.conf.broker_url
        app.conf.broker_url = f"redis://127.0.0.1:{free_port()}/0"
        try:
            response = client.get("/healthz")
        finally:
            app.conf.broker_url = original
    else:  # the embedded broker: its folder cannot be written
        options = dict(settings.CELERY_BROKER_TRANSPORT_OPTIONS)
        options["data_folder_out"] = str(tmp_path / "missing")
        with override_settings(CELERY_BROKER_TRANSPORT_OPTIONS=options):
            response = client.get("/healthz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "fail" and body["failing"] == ["broker"]
    assert body["checks"]["broker"] in ("timed out", "failed: PermissionError")
    assert body["checks"]["database"] == "ok"


def test_healthz_names_the_failing_part_and_answers_fast(client: Client, settings, tmp_path):
    options = dict(settings.CELERY_BROKER_TRANSPORT_OPTIONS)
    options["data_folder_out"] = str(tmp_path / "missing")
    broken = {
        "REDIS_URL": "redis://127.0.0.1:1/0",
        "CELERY_BROKER_TRANSPORT_OPTIONS": options,
    }
    t0 = time.monotonic()
    with override_settings(**broken):
        response = client.get("/healthz")
    assert time.monotonic() - t0 < 3
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "fail" and "redis" in body["failing"]
    assert body["checks"]["database"] == "ok"
    assert "127.0.0.1:1" not in response.content.decode()


@pytest.fixture
def probed_endpoint(transactional_db: None, settings) -> Any:
    """A provider and its endpoint, pinged every 10 s on a 5 s tick: stale after 40 s."""
    from healthchecks.models import Endpoint
    from tests.factories import ProviderFactory

    settings.LLMROTATE_PROBE_TICK_SECONDS = 5
    provider = ProviderFactory(base_url="https://probed.test/v1")
    return Endpoint.objects.create(
        base_url=provider.base_url, ping_interval_seconds=10, http_interval_seconds=60
    )


def _probed_ago(endpoint: Any, seconds: float) -> None:
    from django.utils import timezone

    type(endpoint).objects.filter(pk=endpoint.pk).update(
        last_checked_at=timezone.now() - timedelta(seconds=seconds)
    )


def test_healthz_says_the_probes_run_while_results_keep_coming(probed_endpoint: Any):
    _probed_ago(probed_endpoint, 30)
    response = Client().get("/healthz")
    assert response.status_code == 200
    assert response.json()["status"] == "ok" and response.json()["checks"]["probes"] == "ok"


def test_healthz_is_degraded_not_failing_when_the_probes_stopped(probed_endpoint: Any):
    """The worker or beat is gone: routing goes on from the last known health, so the gateway
    stays in its load balancer (200), and says what is wrong."""
    _probed_ago(probed_endpoint, 1000)
    response = Client().get("/healthz")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "degraded" and body["degraded"] == ["probes"]
    assert body["checks"]["probes"] == "stale: no probe result for 1000 s"
    assert body["failing"] == []


def test_healthz_finds_a_gateway_whose_worker_never_ran(transactional_db: None, settings):
    """No endpoint row at all (the worker creates them): counted from the provider's creation."""
    from keys.models import Provider
    from tests.factories import ProviderFactory

    settings.LLMROTATE_PROBE_TICK_SECONDS = 5
    settings.LLMROTATE_PING_INTERVAL_SECONDS = 10
    provider = ProviderFactory()
    assert Client().get("/healthz").json()["checks"]["probes"] == "ok"  # just created
    Provider.objects.filter(pk=provider.pk).update(
        created_at=timezone.now() - timedelta(seconds=600)
    )
    body = Client().get("/healthz").json()
    assert body["status"] == "degraded" and body["checks"]["probes"].startswith("stale")


def test_healthz_reports_probes_off_when_they_are_switched_off(probed_endpoint: Any, settings):
    settings.LLMROTATE_HEALTH_CHECKS = False
    _probed_ago(probed_endpoint, 1000)
    body = Client().get("/healthz").json()
    assert body["status"] == "ok" and body["checks"]["probes"] == "off"


def test_pings_this_host_cannot_send_do_not_make_the_probes_look_stale(probed_endpoint: Any):
    """Where ICMP is unavailable a ping leaves no result: the HTTP probe's interval is what
    results can be expected by (60 s here, so 100 s since the last one is fine)."""
    from healthchecks.models import ProbeStatus

    type(probed_endpoint).objects.filter(pk=probed_endpoint.pk).update(
        ping_status=ProbeStatus.UNAVAILABLE
    )
    _probed_ago(probed_endpoint, 100)
    assert Client().get("/healthz").json()["checks"]["probes"] == "ok"


@pytest.mark.parametrize(
    ("switched_off", "age", "expected"),
    # Pings every 10 s, HTTP every 60 s: with pings off, 100 s without a result is fine; with
    # HTTP off, 100 s is three missed pings and more; with both off there is nothing to wait for.
    [
        ("LLMROTATE_PING_PROBES", 100, "ok"),
        ("LLMROTATE_HTTP_PROBES", 100, "stale"),
        ("both", 1000, "off"),
    ],
)
def test_a_kind_of_probe_switched_off_in_the_settings_is_not_waited_for(
    probed_endpoint: Any, settings, switched_off: str, age: float, expected: str
):
    for name in ("LLMROTATE_PING_PROBES", "LLMROTATE_HTTP_PROBES"):
        if switched_off in (name, "both"):
            setattr(settings, name, False)
    _probed_ago(probed_endpoint, age)
    assert Client().get("/healthz").json()["checks"]["probes"].startswith(expected)


def test_an_endpoint_of_a_disabled_provider_is_not_waited_for(probed_endpoint: Any):
    from keys.models import Provider

    Provider.objects.filter(base_url=probed_endpoint.base_url).update(enabled=False)
    _probed_ago(probed_endpoint, 1000)
    assert Client().get("/healthz").json()["checks"]["probes"] == "off"
