"""The dashboard's Experiments page: who may see it, the empty state, the rules' figures against
the selector's, the sample-size warning, and (in a real Chromium) the table and the activation
chart, which survives the panel's polls.

Calls are written through the production write path (records and rollups in one transaction),
so the page reads what a gateway would have recorded. The server-side tests run on both legs;
the browser test only on the embedded one, as every browser test.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import UTC, timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.contrib.auth.models import Permission, User
from django.test import Client
from django.utils import timezone

from common.timeframes import DEFAULT_BUCKETS, TimeFrame, timeframe_parse
from keys.models import Provider, ReplacementRule, Route
from llmrotate_site.dashboard.query import local_floor
from llmrotate_site.dashboard.templatetags.dashboard import ms, pct, usd
from tests.dashboard.conftest import POLL_TIMEOUT_MS, Dashboard, log_in, screenshot
from tests.factories import ApiKeyFactory, ClientTokenFactory, ProviderFactory, RouteFactory
from tests.usage.monitoring import call, write_calls
from usage.calls import CallData
from usage.models import Arm, Outcome
from usage.replacement_selectors import (
    MIN_SAMPLE,
    RuleMetrics,
    replacement_activation,
    replacement_metrics,
)

pytestmark = pytest.mark.django_db

RULE = "cheaper-mini"
PAGE = "/dashboard/experiments/"


@pytest.fixture
def staff(client: Client) -> Client:
    client.force_login(User.objects.create_superuser("ops", "ops@example.com", "pw"))
    return client


def make_rule(*, route: Any = None, provider: Any = None, **fields: Any) -> ReplacementRule:
    route = route or RouteFactory(name="gpt-4o")
    provider = provider or ProviderFactory(name="openai")
    values: dict[str, Any] = {
        "name": RULE,
        "route": route,
        "target_provider": provider,
        "target_model": "gpt-4o-mini",
        "probability": 0.5,
        "stickiness": ReplacementRule.Stickiness.PER_SESSION,
    }
    values.update(fields)
    rule = ReplacementRule(**values)
    rule.full_clean()
    rule.save()
    return rule


def traffic(
    *,
    replaced: int,
    control: int,
    replaced_errors: int = 0,
    control_errors: int = 0,
    opt_out_header: int = 0,
    opt_out_token: int = 0,
    rule: str = RULE,
    route: str = "gpt-4o",
) -> None:
    """Final records of one rule's requests, a few minutes old: the replaced ones answered by
    openai/gpt-4o-mini (cheaper, faster, fewer tokens), every third starting a session's
    replacement; the rest by openai/gpt-4o. Errors are upstream errors (502)."""
    start = timezone.now() - timedelta(minutes=10)
    calls: list[CallData] = []

    def add(arm: str, *, ms: int, failed: bool = False, **fields: Any) -> None:
        at = start + timedelta(seconds=len(calls))
        fields.setdefault("upstream_model", route)
        data = call(
            started_at=at, finished_at=at + timedelta(milliseconds=ms),
            requested_model=route, provider="openai", provider_kind="openai", final=True,
            outcome=Outcome.UPSTREAM_ERROR if failed else Outcome.SUCCESS,
            status_code=502 if failed else 200, client_status=502 if failed else 200,
            experiment=rule, arm=arm, **fields,
        )  # fmt: skip
        calls.append(data)

    for i in range(replaced):
        add(
            Arm.REPLACED, ms=200, failed=i < replaced_errors, upstream_model="gpt-4o-mini",
            replacement_attempt=True, replacement_start=i % 3 == 0, session_id=f"s-{i // 3}",
            turn=1 + i % 3 + (i // 9), latency_ms=200.0 + i, ttft_ms=80.0 + i,
            completion_tokens=20 + i % 5, total_tokens=40 + i % 5, tool_calls=i % 2,
            cost_usd=Decimal("0.0010") + Decimal(i % 4) / 10_000,
        )  # fmt: skip
    for i in range(control):
        add(
            Arm.CONTROL, ms=600, failed=i < control_errors, latency_ms=600.0 + 2 * i,
            ttft_ms=150.0 + i, completion_tokens=35 + i % 7, total_tokens=60 + i % 7,
            tool_calls=1, cost_usd=Decimal("0.0100") + Decimal(i % 3) / 1000,
        )  # fmt: skip
    for arm, n in ((Arm.OPT_OUT_HEADER, opt_out_header), (Arm.OPT_OUT_TOKEN, opt_out_token)):
        for _ in range(n):
            add(arm, ms=500, latency_ms=500.0, cost_usd=Decimal("0.0100"))
    write_calls(calls)


def metrics_now() -> RuleMetrics:
    """The selector's figures for the page's default frame (the last 24 hours)."""
    now = timezone.now()
    frame = timeframe_parse(window="24h", since=None, until=None, now=now)
    (m,) = replacement_metrics(frame=frame, now=now, rule=RULE)
    return m


def cell_text(html: str) -> str:
    return " ".join(re.sub(r"<[^>]+>", " ", html).split())


def row(html: str, attribute: str) -> str:
    found = re.search(rf"<tr {attribute}[^>]*>(.*?)</tr>", html, re.S)
    assert found, f"no row with {attribute}"
    return found.group(1)


def cell(row_html: str, attribute: str) -> str:
    found = re.search(rf"<td [^>]*{attribute}[^>]*>(.*?)</td>", row_html, re.S)
    assert found, f"no {attribute} cell in {row_html}"
    return cell_text(found.group(1))


def section(html: str, rule: str) -> str:
    found = re.search(rf'<article [^>]*data-experiment="{rule}"[^>]*>(.*?)</article>', html, re.S)
    assert found, f"no section of {rule}"
    return found.group(1)


def arms(html: str, metric: str) -> tuple[str, str, str, str]:
    """(replaced, not replaced, difference, interval) of one effectiveness row."""
    r = row(html, f'data-metric="{metric}"')
    return (
        cell(r, 'data-arm="replaced"'),
        cell(r, 'data-arm="not_replaced"'),
        cell(r, "data-difference"),
        cell(r, "data-interval"),
    )


# --- access and navigation -------------------------------------------------------------------


def test_anonymous_visitors_go_to_the_login_page(client: Client) -> None:
    response = client.get(PAGE)
    assert response.status_code == 302
    assert response["Location"].startswith("/admin/login/?next=")


def test_staff_need_the_monitoring_permission(client: Client) -> None:
    clerk = User.objects.create_user("clerk", password="pw", is_staff=True)
    client.force_login(clerk)
    assert client.get(PAGE).status_code == 403
    assert client.get("/dashboard/panels/experiments/").status_code == 403
    clerk.user_permissions.add(Permission.objects.get(codename="view_callrecord"))
    client.force_login(User.objects.get(pk=clerk.pk))
    assert client.get(PAGE).status_code == 200


def test_the_page_is_in_the_navigation_with_the_frame(staff: Client) -> None:
    html = staff.get(f"{PAGE}?window=7d").content.decode()
    assert f'<a href="{PAGE}?window=7d" aria-current="page">Experiments</a>' in html
    assert f'<a href="{PAGE}?window=7d"' in staff.get("/dashboard/?window=7d").content.decode()
    # The time-frame picker, as on every page.
    assert 'class="frame-picker"' in html
    assert re.search(r'<a href="\?window=7d" aria-current="true">7d</a>', html)


# --- empty state -----------------------------------------------------------------------------


def test_without_rules_it_says_how_to_add_one(staff: Client) -> None:
    html = staff.get(PAGE).content.decode()
    assert 'id="experiments-empty"' in html
    words = cell_text(html)
    assert "No replacement rules" in words
    assert "Keys and routes → Replacement rules" in words
    assert 'href="/admin/keys/replacementrule/add/"' in html
    assert "replacement:" in html and "import_config" in html
    assert f"at least {MIN_SAMPLE} requests in each group" in words
    assert 'id="experiments-rules"' not in html
    assert "data-activation-chart" not in html


# --- figures ---------------------------------------------------------------------------------


def test_the_rules_table_shows_the_selectors_figures(staff: Client) -> None:
    make_rule()
    traffic(replaced=7, control=9, replaced_errors=1, opt_out_header=2, opt_out_token=3)
    m = metrics_now()
    # The scripted traffic is what the selector sees (the test would mean little otherwise).
    assert (m.eligible, m.replaced, m.opt_outs_header, m.opt_outs_token) == (21, 7, 2, 3)
    assert m.sessions_replaced == 3

    html = staff.get(PAGE).content.decode()
    assert 'id="experiments-empty"' not in html
    r = row(html, f'data-rule="{RULE}"')
    assert RULE in r
    assert cell(r, "data-target") == "gpt-4o → openai/gpt-4o-mini"
    assert cell(r, "data-probability") == "50.0%"
    assert cell(r, "data-stickiness") == "per session"
    assert cell(r, "data-state") == "active"
    assert cell(r, "data-eligible") == str(m.eligible)
    assert cell(r, "data-replaced") == str(m.replaced)
    assert cell(r, "data-activation") == pct(m.activation_rate) == "33.3%"
    assert cell(r, "data-opt-outs-header") == str(m.opt_outs_header)
    assert cell(r, "data-opt-outs-token") == str(m.opt_outs_token)
    assert cell(r, "data-sessions-replaced") == str(m.sessions_replaced)


def test_the_effectiveness_table_matches_the_selector(staff: Client) -> None:
    make_rule()
    traffic(replaced=40, control=45, replaced_errors=2, control_errors=6)
    m = metrics_now()
    a, b = m.replaced_arm, m.control_arm
    assert (a.requests, b.requests) == (40, 45)

    html = section(staff.get(PAGE).content.decode(), RULE)
    assert arms(html, "requests")[:2] == ("40", "45")
    success = arms(html, "success_rate")
    assert success[:2] == (pct(a.success_rate), pct(b.success_rate)) == ("95.0%", "86.7%")
    s = m.success_rate_difference
    assert s.difference is not None and s.low is not None and s.high is not None
    assert success[2] == f"+{s.difference * 100:.1f} points"
    low, high = (f"{v * 100:+.1f}".replace("-", "\u2212") for v in (s.low, s.high))
    assert success[3] == f"{low} points to {high} points"
    # The error rate is one minus the success rate in both arms: its interval is the negation.
    error = arms(html, "error_rate")
    assert error[:2] == (pct(a.error_rate), pct(b.error_rate))
    assert error[2] == f"\u2212{s.difference * 100:.1f} points"
    # By outcome: the share of requests and their count.
    assert arms(html, "errors:upstream_error")[:2] == ("5.0% (2)", "13.3% (6)")
    for metric, va, vb in (
        ("latency_p50", a.latency.p50, b.latency.p50),
        ("latency_p95", a.latency.p95, b.latency.p95),
        ("ttft_p50", a.ttft.p50, b.ttft.p50),
        ("ttft_p95", a.ttft.p95, b.ttft.p95),
    ):
        assert va is not None and vb is not None
        assert arms(html, metric)[:3] == (ms(va), ms(vb), f"\u2212{vb - va:.0f} ms"), metric
    tokens = arms(html, "completion_tokens_per_request")
    assert tokens[:2] == (
        f"{a.completion_tokens / a.requests:.1f}",
        f"{b.completion_tokens / b.requests:.1f}",
    )
    cost = arms(html, "cost_per_request")
    assert cost[:2] == (usd(a.cost_usd / a.requests), usd(b.cost_usd / b.requests))
    c = m.cost_per_request_difference
    assert c.difference is not None and c.low is not None and c.high is not None
    assert c.difference < 0 and cost[2] == f"\u2212{usd(-c.difference)}"
    assert cost[3] == f"\u2212{usd(-c.low)} to \u2212{usd(-c.high)}"
    tools = arms(html, "tool_calls_per_request")
    assert tools[:2] == (f"{a.tool_calls / a.requests:.2f}", f"{b.tool_calls / b.requests:.2f}")
    answered = arms(html, "answered_by")
    assert answered[:2] == ("openai/gpt-4o-mini 40", "openai/gpt-4o 45")


def test_the_first_replacement_turns_are_shown(staff: Client) -> None:
    make_rule()
    traffic(replaced=12, control=3)
    m = metrics_now()
    assert m.first_turns  # every third replaced request began a session's replacement
    html = section(staff.get(PAGE).content.decode(), RULE)
    for turn, starts in m.first_turns.items():
        assert cell(row(html, f'data-turn="{turn}"'), "data-starts") == str(starts)
    assert html.count("data-turn=") == len(m.first_turns)


def test_the_activation_chart_data_is_the_selectors(staff: Client) -> None:
    make_rule()
    traffic(replaced=6, control=10, opt_out_header=1)
    html = staff.get(PAGE).content.decode()
    assert f'data-activation-chart="activation-data-{RULE}"' in html
    found = re.search(
        rf'<script id="activation-data-{RULE}" type="application/json">(.*?)</script>', html
    )
    assert found
    data = json.loads(found.group(1))
    # The same buckets as the other pages' charts for this frame (24 hours from the hour:
    # 15 minutes).
    now = timezone.now()
    since = timeframe_parse(window="24h", since=None, until=None, now=now).since
    assert since is not None
    frame = TimeFrame(since=local_floor(since, timedelta(hours=1), UTC))
    bucket = DEFAULT_BUCKETS["24h"]
    assert data["bucket_seconds"] == int(bucket.total_seconds())
    points = replacement_activation(rule=RULE, frame=frame, bucket=bucket, now=now)
    assert [p.start.isoformat() for p in points] == data["labels"]
    assert data["eligible"] == [p.eligible for p in points]
    assert data["replaced"] == [p.replaced for p in points]
    assert (sum(data["eligible"]), sum(data["replaced"])) == (17, 6)
    assert data["empty"] is False


def test_a_small_sample_shows_the_warning_with_the_summary(staff: Client) -> None:
    make_rule()
    traffic(replaced=MIN_SAMPLE - 1, control=MIN_SAMPLE + 10)
    m = metrics_now()
    assert m.sample_too_small
    html = section(staff.get(PAGE).content.decode(), RULE)
    found = re.search(r"<div [^>]*data-sample-warning[^>]*>(.*?)</div>", html, re.S)
    assert found, "no sample-size warning"
    assert 'class="notice tone-warn"' in found.group(0)
    assert cell_text(found.group(1)) == f"Sample too small. {m.summary}"
    assert "Too few requests to compare: 29 replaced and 40 not replaced" in m.summary


def test_a_big_enough_sample_shows_the_summary_without_the_warning(staff: Client) -> None:
    make_rule()
    traffic(replaced=MIN_SAMPLE, control=MIN_SAMPLE, control_errors=5)
    m = metrics_now()
    assert not m.sample_too_small and m.summary
    html = section(staff.get(PAGE).content.decode(), RULE)
    assert "data-sample-warning" not in html
    found = re.search(r"<p [^>]*data-summary[^>]*>(.*?)</p>", html, re.S)
    assert found and cell_text(found.group(1)) == m.summary


def test_a_rule_without_traffic_in_the_frame_is_listed_with_an_empty_chart(
    staff: Client,
) -> None:
    make_rule(enabled=False)
    html = staff.get(PAGE).content.decode()
    r = row(html, f'data-rule="{RULE}"')
    assert (cell(r, "data-eligible"), cell(r, "data-activation")) == ("0", "—")
    assert cell(r, "data-state") == "disabled"
    rule = section(html, RULE)
    assert 'class="chart-card is-empty"' in rule
    assert "No eligible requests in this time frame" in rule
    assert "data-sample-warning" in rule  # nothing to compare: 0 and 0


def test_scheduled_ended_and_deleted_rules_say_so(staff: Client) -> None:
    now = timezone.now()
    route, provider = RouteFactory(name="gpt-4o"), ProviderFactory(name="openai")
    make_rule(route=route, provider=provider, name="later", active_from=now + timedelta(hours=1))
    make_rule(
        route=route,
        provider=provider,
        name="over",
        active_from=now - timedelta(days=2),
        active_until=now - timedelta(days=1),
    )
    # A rule deleted since: its requests are still in the rollups, so it still shows.
    traffic(replaced=2, control=2, rule="gone")
    html = staff.get(PAGE).content.decode()
    assert cell(row(html, 'data-rule="later"'), "data-state").startswith("scheduled from ")
    assert cell(row(html, 'data-rule="over"'), "data-state").startswith("ended from ")
    gone = row(html, 'data-rule="gone"')
    assert cell(gone, "data-state") == "deleted"
    assert cell(gone, "data-target") == "gpt-4o → (rule deleted)"
    assert cell(gone, "data-probability") == "—"
    assert cell(gone, "data-eligible") == "4"


def test_the_panel_polls_its_own_url(staff: Client) -> None:
    make_rule()
    traffic(replaced=3, control=3)
    html = staff.get("/dashboard/panels/experiments/?window=1h").content.decode()
    assert html.lstrip().startswith('<section id="panel-experiments"')
    assert 'hx-get="/dashboard/panels/experiments/?window=1h"' in html
    assert cell(row(html, f'data-rule="{RULE}"'), "data-eligible") == "6"


def test_nothing_secret_is_in_the_page(staff: Client) -> None:
    provider = ProviderFactory(name="openai")
    key = ApiKeyFactory(provider=provider)
    token = ClientTokenFactory(name="app", never_replace=True)
    make_rule(provider=provider, clients=["app"])
    traffic(replaced=3, control=3, opt_out_token=1)
    # (str(): the factories' attributes are typed as their declarations.)
    secrets = [str(v) for v in (key.raw_secret, token.raw_token, token.token_hash, token.prefix)]
    for path in (PAGE, "/dashboard/panels/experiments/"):
        html = staff.get(path).content.decode()
        assert RULE in html
        for secret in secrets:
            assert secret not in html, path


# --- in a browser ----------------------------------------------------------------------------


@pytest.fixture
def experiment(configured_dashboard: Dashboard) -> Iterator[Dashboard]:
    """The seeded configuration, a rule on its gpt-4o route, and a few minutes of traffic."""
    make_rule(route=Route.objects.get(name="gpt-4o"), provider=Provider.objects.get(name="openai"))
    traffic(replaced=12, control=14, replaced_errors=1, opt_out_header=1)
    yield configured_dashboard


@pytest.mark.embedded
@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_in_a_browser_the_table_and_chart_show_and_the_chart_survives_polls(
    experiment: Dashboard, new_page: Any, poll_every: Any
) -> None:
    poll_every(1)
    page, _ = new_page()
    log_in(page, experiment, next_path=PAGE)
    row_ = page.locator(f"#experiments-rules tr[data-rule='{RULE}']")
    assert row_.locator("[data-eligible]").inner_text() == "27"
    assert row_.locator("[data-replaced]").inner_text() == "12"
    assert page.locator(".tabs a[aria-current=page]").inner_text() == "Experiments"
    # The chart is drawn on its canvas, with the page's data.
    canvas_id = f"activation-{RULE}"
    page.wait_for_function(f"() => window.Chart && Chart.getChart('{canvas_id}')")
    drawn = page.evaluate(
        f"""() => {{
            const c = Chart.getChart('{canvas_id}');
            window.__firstChart = c;
            return [c.data.datasets[0].data.reduce((a, b) => a + b, 0),
                    c.data.datasets[1].data.reduce((a, b) => a + b, 0),
                    c.canvas.width > 0 && c.canvas.height > 0];
        }}"""
    )
    assert drawn == [12, 27, True]
    # And the bars stand where the user sees them: once the animation is over, every bucket
    # with eligible requests has a bar of some height inside the chart area.
    page.wait_for_function(
        f"""() => {{
            const c = Chart.getChart('{canvas_id}');
            if (c.isAnimating?.() ?? false) return false;
            const area = c.chartArea;
            const bars = c.getDatasetMeta(1).data.filter((_, i) => c.data.datasets[1].data[i]);
            return bars.length > 0 && bars.every(b => b.x >= area.left && b.x <= area.right
                && Number.isFinite(b.height) && Math.abs(b.height) >= 1);
        }}""",
        timeout=POLL_TIMEOUT_MS,
    )
    warning = page.locator(f"#rule-{RULE} [data-sample-warning]")
    assert warning.is_visible()
    assert "Too few requests to compare" in warning.inner_text()
    assert page.locator(f"#rule-{RULE} tr[data-metric=success_rate]").is_visible()

    # New traffic arrives; a poll brings it, and the same chart (not a new one) shows it.
    traffic(replaced=3, control=0)
    page.wait_for_function(
        f"""() => document.querySelector("tr[data-rule='{RULE}'] [data-eligible]")
                    .textContent.trim() === '30'""",
        timeout=POLL_TIMEOUT_MS,
    )
    page.wait_for_function(
        f"""() => {{
            const c = Chart.getChart('{canvas_id}');
            return c && c.data.datasets[1].data.reduce((a, b) => a + b, 0) === 30;
        }}""",
        timeout=POLL_TIMEOUT_MS,
    )
    assert page.evaluate(
        f"""() => Chart.getChart('{canvas_id}') === window.__firstChart
                  && document.getElementById('{canvas_id}').isConnected"""
    )
    screenshot(page, "experiments")
