"""GET /metrics in process: the gauges read from shared state at each scrape (breakers, the last
successful probe, keys), who may scrape, what a dead process leaves behind, and that no secret
reaches the text."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from django.test import Client, override_settings
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from healthchecks import services
from healthchecks.models import Endpoint, ProbeStatus
from healthchecks.probes import ProbeResult
from keys.models import ClientToken
from llmrotate_site.metrics import SHARED_STATE_GAUGES, forget_dead_processes
from tests.factories import ApiKeyFactory, ClientTokenFactory, ProviderFactory
from tests.healthchecks.conftest import open_breaker

pytestmark = pytest.mark.django_db

SECRET = "sk-live-secret-value-0123456789abcdef"


def scrape(client: Client, token: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    response = client.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {token}")
    assert response.status_code == 200, response.content
    text = response.content.decode()
    assert SECRET not in text and token not in text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.fixture
def monitor_token() -> str:
    token = ClientTokenFactory(scopes=[ClientToken.Scope.MONITOR.value])
    return str(token.raw_token)


def test_breakers_and_the_last_successful_probe_are_read_at_each_scrape(
    client: Client, monitor_token: str
) -> None:
    ProviderFactory(name="good", base_url="https://good.example.test/v1")
    bad = ProviderFactory(name="bad", base_url="https://user:hunter22@bad.example.test/v1")
    ApiKeyFactory(provider=bad, raw_secret=SECRET)
    services.endpoints_sync()
    good_ep = Endpoint.objects.get(base_url__contains="good")
    services.probe_record(endpoint=good_ep, kind="http", result=ProbeResult(ProbeStatus.OK))
    services.probe_record(
        endpoint=good_ep, kind="ping", result=ProbeResult(ProbeStatus.FAILED, error="timeout")
    )
    open_breaker("https://user:hunter22@bad.example.test/v1")

    samples = scrape(client, monitor_token)
    good_ep.refresh_from_db()
    assert good_ep.last_http_ok_at is not None
    probe = "llmrotate_probe_last_success_timestamp_seconds"
    good = "https://good.example.test/v1"
    assert samples[(probe, frozenset({("endpoint", good), ("kind", "http")}))] == pytest.approx(
        good_ep.last_http_ok_at.timestamp()
    )
    # A ping that failed is not a success: no timestamp until one succeeds.
    assert (probe, frozenset({("endpoint", good), ("kind", "ping")})) not in samples

    breaker = "llmrotate_circuit_breaker_state"
    masked = [dict(ls)["endpoint"] for (n, ls) in samples if n == breaker and "bad" in str(ls)]
    assert masked and all("hunter22" not in e for e in masked)
    bad_url = masked[0]
    states = {
        dict(ls)["state"]: v
        for (n, ls), v in samples.items()
        if n == breaker and dict(ls)["endpoint"] == bad_url
    }
    assert states == {"closed": 0, "open": 1, "half_open": 0}
    assert samples[(breaker, frozenset({("endpoint", good), ("state", "closed")}))] == 1
    assert samples[("llmrotate_keys", frozenset({("provider", "bad"), ("state", "active")}))] == 1
    assert {n for (n, _) in samples} >= set(SHARED_STATE_GAUGES) - {
        "llmrotate_key_remaining_requests",  # only keys whose upstream reported headroom
        "llmrotate_key_remaining_tokens",
    }


def test_a_proxy_token_cannot_scrape_and_the_scrape_token_can(
    client: Client, monitor_token: str
) -> None:
    proxy = ClientTokenFactory()
    assert client.get("/metrics").status_code == 401
    response = client.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {proxy.raw_token}")
    assert response.status_code in (401, 403)
    with override_settings(LLMROTATE_METRICS_TOKEN="a-scrape-token-of-thirty-characters"):
        ok = client.get("/metrics", HTTP_AUTHORIZATION="Bearer a-scrape-token-of-thirty-characters")
        assert ok.status_code == 200
        assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 401


def test_a_dead_process_keeps_its_counters_but_not_its_queue(tmp_path: Path) -> None:
    """A worker uvicorn replaced: its counts stay in the sums (or they would go backwards),
    its last queue depth does not."""
    child = textwrap.dedent(
        """
        from prometheus_client import Counter, Gauge
        Counter("t_calls", "", ["k"]).labels("a").inc(5)
        Gauge("t_queue", "", multiprocess_mode="livesum").set(7)
        """
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", child], env=env, check=True, timeout=60)

    def values() -> dict[str, float]:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(tmp_path))
        return {s.name: s.value for f in registry.collect() for s in f.samples}

    assert values()["t_queue"] == 7
    forget_dead_processes(tmp_path)
    after = values()
    assert "t_queue" not in after
    assert after["t_calls_total"] == 5
