"""The Health page's probe history: a latency line per probe kind (an HTTP probe's response
time and a ping's round trip are not one measure), failures marked rather than averaged in,
and lines and results that follow the page's time frame. Both legs: the lines are grouped in
the database, differently on SQLite and Postgres."""

from __future__ import annotations

import re
from datetime import datetime, timedelta

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.utils import timezone

from healthchecks.models import Endpoint, HealthEvent, ProbeKind, ProbeStatus
from healthchecks.selectors import POINTS
from llmrotate_site.dashboard.panels import sparkline
from tests.factories import ProviderFactory

pytestmark = pytest.mark.django_db

URL = "https://probed.example.test/v1"
DASH = "\u2013"  # between the ends of a latency range


@pytest.fixture
def staff(client: Client) -> Client:
    client.force_login(User.objects.create_superuser("ops", "ops@example.com", "pw"))
    return client


@pytest.fixture
def endpoint() -> Endpoint:
    ProviderFactory(name="probed", base_url=URL)
    return Endpoint.objects.create(base_url=URL, last_checked_at=timezone.now())


def probe(endpoint: Endpoint, kind: str, latency: float | None, *, at: datetime) -> None:
    ok = latency is not None
    HealthEvent.objects.create(
        endpoint=endpoint,
        kind=kind,
        ok=ok,
        status=ProbeStatus.OK if ok else ProbeStatus.FAILED,
        latency_ms=latency if ok else None,
        error="" if ok else "connection refused",
        created_at=at,
    )


def line(html: str, kind: str) -> str:
    """The probe line of one kind, as rendered."""
    match = re.search(rf'<figure class="probe-line" data-kind="{kind}">(.*?)</figure>', html, re.S)
    assert match, f"no {kind} line"
    return match.group(1)


def panel(client: Client, query: str) -> str:
    return client.get(f"/dashboard/panels/endpoints/?{query}").content.decode()


def card(html: str, provider: str) -> str:
    """The card of the endpoint the provider uses, as rendered."""
    cards = re.findall(r'<article class="card endpoint">.*?</article>', html, re.S)
    mine = [c for c in cards if f'<span class="subtle">{provider}</span>' in c]
    assert len(mine) == 1, f"{len(mine)} cards for {provider}"
    return mine[0]


def test_http_and_ping_each_have_their_own_line(staff: Client, endpoint: Endpoint) -> None:
    now = timezone.now()
    for i, (http, ping) in enumerate([(200, 10), (300, 14), (None, 12), (250, 11)]):
        probe(endpoint, ProbeKind.HTTP, http, at=now - timedelta(minutes=10 - 2 * i))
        probe(endpoint, ProbeKind.PING, ping, at=now - timedelta(minutes=9 - 2 * i))
    html = panel(staff, "window=1h")
    http_line = line(html, "http")
    assert f"200{DASH}300 ms" in http_line  # the ping's 10-14 ms are not in it
    assert "4 probes" in http_line and "1 failed" in http_line
    assert http_line.count('class="probe-fail"') == 1  # marked, not drawn as 0 ms
    ping_line = line(html, "ping")
    assert f"10{DASH}14 ms" in ping_line and "4 probes" in ping_line
    assert 'class="probe-fail"' not in ping_line


def test_the_lines_and_results_follow_the_time_frame(staff: Client, endpoint: Endpoint) -> None:
    now = timezone.now()
    probe(endpoint, ProbeKind.HTTP, 900, at=now - timedelta(hours=3))
    probe(endpoint, ProbeKind.HTTP, None, at=now - timedelta(hours=3, minutes=1))
    for i, latency in enumerate([100, 120]):
        probe(endpoint, ProbeKind.HTTP, latency, at=now - timedelta(minutes=20 - 10 * i))

    hour = panel(staff, "window=1h")
    assert f"100{DASH}120 ms" in line(hour, "http")
    assert "connection refused" not in hour  # the failure three hours ago
    assert "2 probes in this time frame" in hour
    day = panel(staff, "window=24h")
    assert f"100{DASH}900 ms" in line(day, "http")
    assert "connection refused" in day
    assert "4 probes in this time frame, " in day

    past = panel(staff, "since=2000-01-01T00:00&until=2000-01-02T00:00")
    assert "no HTTP probes in this time frame" in line(past, "http")
    assert "No probe results in this time frame" in past


def test_a_long_frame_is_drawn_with_a_bounded_number_of_points(
    staff: Client, endpoint: Endpoint
) -> None:
    now = timezone.now()
    HealthEvent.objects.bulk_create(
        HealthEvent(
            endpoint=endpoint, kind=ProbeKind.PING, ok=True, status=ProbeStatus.OK,
            latency_ms=40 + 10 * (i // 100), created_at=now - timedelta(minutes=10 * i),
        )
        for i in range(1000)  # a week of probes, every ten minutes
    )  # fmt: skip
    ping = line(panel(staff, "window=7d"), "ping")
    points = re.search(r'<polyline points="([^"]+)"', ping)
    assert points
    assert 2 <= len(points.group(1).split()) <= POINTS
    assert f"40{DASH}130 ms" in ping and "1.00k probes" in ping


def test_a_sparkline_spans_its_box_and_its_values() -> None:
    points = sparkline([(0, 10.0), (0.5, 30.0), (1, 20.0)], width=160, height=28)
    assert points == "2.0,26.0 80.0,2.0 158.0,14.0"
    assert sparkline([(0, 10.0)]) == ""  # one sample is not a line


def test_endpoints_that_differ_only_in_their_secrets_each_show_their_own_history(
    staff: Client,
) -> None:
    # Both show as https://***@h.test/v1?api-key=***: only their rows tell them apart.
    urls = {
        "first": "https://u:tok3n-first@h.test/v1?api-key=s3cret-first",
        "second": "https://v:tok3n-second@h.test/v1?api-key=s3cret-second",
    }
    now = timezone.now()
    for i, (name, url) in enumerate(urls.items()):
        ProviderFactory(name=name, base_url=url)
        endpoint = Endpoint.objects.create(base_url=url, last_checked_at=now)
        for minutes, latency in ((20, 100 + 500 * i), (10, 120 + 500 * i)):
            probe(endpoint, ProbeKind.HTTP, latency, at=now - timedelta(minutes=minutes))
    html = panel(staff, "window=1h")
    assert f"100{DASH}120 ms" in line(card(html, "first"), "http")
    assert f"600{DASH}620 ms" in line(card(html, "second"), "http")
    assert "https://***@h.test/v1?api-key=***" in card(html, "first")
    for secret in ("tok3n", "s3cret"):
        assert secret not in html


def test_a_degraded_endpoint_says_so_on_its_card(staff: Client, endpoint: Endpoint) -> None:
    # Pings fail their threshold while the HTTP probe answers: still in routing, but not well.
    endpoint.is_up, endpoint.ping_failures = True, endpoint.ping_failure_threshold
    endpoint.save()
    head = re.search(r'<header class="card-head">(.*?)</header>', panel(staff, "window=1h"), re.S)
    assert head
    assert re.search(r'class="badge endpoint-health tone-warn"[^>]*>degraded<', head.group(1))
