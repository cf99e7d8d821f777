"""Capture rules: in the config file (import, export, errors), in the admin ("capture this
client for 15 minutes"), and in the routing snapshot that the proxy asks per request."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from keys.config_io import config_export, config_import
from keys.config_schema import ConfigError
from keys.models import CaptureRule
from keys.routing import CaptureSpec, RoutingSnapshot, routing_snapshot_sync
from tests.factories import ClientTokenFactory, RouteFactory

pytestmark = pytest.mark.django_db

BASE: dict[str, Any] = {
    "providers": {"openai": {"kind": "openai", "base_url": "https://api.openai.com/v1"}},
    "routes": {"gpt-4o-mini": {"deployments": [{"provider": "openai", "model": "gpt-4o-mini"}]}},
    "clients": [{"name": "ci", "routes": ["*"], "scopes": ["proxy"]}],
}


def with_capture(*rules: dict[str, Any]) -> dict[str, Any]:
    return {**BASE, "capture": list(rules)}


def errors_of(data: Any) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        config_import(data=data)
    return caught.value.errors


def test_capture_rules_are_imported_and_exported_by_scope() -> None:
    config_import(
        data=with_capture(
            {"client": "ci", "sample_rate": 0.25, "until": "2026-12-31T12:00:00Z"},
            {"route": "gpt-4o-mini"},
            {"sample_rate": 0.01, "enabled": False},
        )
    )
    rules = {
        (r.client and r.client.name, r.route and r.route.name): r for r in CaptureRule.objects.all()
    }
    assert set(rules) == {("ci", None), (None, "gpt-4o-mini"), (None, None)}
    assert rules[("ci", None)].sample_rate == 0.25
    assert rules[("ci", None)].until == datetime(2026, 12, 31, 12, tzinfo=UTC)
    assert rules[(None, "gpt-4o-mini")].sample_rate == 1.0
    assert not rules[(None, None)].enabled

    exported = config_export()["capture"]
    assert exported == [
        {"sample_rate": 0.01, "until": None, "enabled": False},
        {"route": "gpt-4o-mini", "sample_rate": 1.0, "until": None, "enabled": True},
        {"client": "ci", "sample_rate": 0.25, "until": "2026-12-31T12:00:00Z", "enabled": True},
    ]
    # What is exported imports again, and changes nothing.
    report = config_import(data={**BASE, "capture": exported})
    assert (report.counts["capture"].created, report.counts["capture"].updated) == (0, 0)


def test_a_rule_of_the_same_scope_is_updated_not_added() -> None:
    config_import(data=with_capture({"client": "ci", "sample_rate": 0.5}))
    config_import(data=with_capture({"client": "ci", "sample_rate": 1}))
    [rule] = CaptureRule.objects.all()
    assert rule.sample_rate == 1.0


def test_bad_capture_rules_get_errors_with_their_paths() -> None:
    errors = errors_of(
        with_capture(
            {"client": "nobody"},
            {"route": "no-such-route"},
            {"route": "gpt-4o-mini", "sample_rate": 1.5},
            {"client": "ci", "sample_rate": -0.1},
            {"client": "ci", "route": "gpt-4o-mini", "until": "2026-12-31T12:00:00"},
            {"sample_rate": 0.5},
            {"sample_rate": 0.2},
        )
    )
    joined = "\n".join(errors)
    assert "capture[0].client: unknown client 'nobody'" in joined
    assert "capture[1].route: unknown route 'no-such-route'" in joined
    assert "capture[2].sample_rate" in joined and "1" in joined
    assert "capture[3].sample_rate" in joined
    assert "capture[4].until" in joined  # a time without a zone is ambiguous
    assert "capture[6]: duplicate capture rule for any client on any route (also capture[5])" in (
        joined
    )
    assert not CaptureRule.objects.exists()


def snapshot_with(*specs: CaptureSpec) -> RoutingSnapshot:
    return RoutingSnapshot(capture=specs)


def test_the_snapshot_takes_the_highest_rate_of_the_rules_that_match() -> None:
    now = time.time()
    snapshot = snapshot_with(
        CaptureSpec(client="", route="", rate=0.1, until=None),
        CaptureSpec(client="ci", route="", rate=0.5, until=None),
        CaptureSpec(client="ci", route="gpt-4o", rate=1.0, until=now - 1),  # ended
        CaptureSpec(client="", route="claude", rate=0.7, until=now + 60),
    )
    assert snapshot.capture_rate("ci", "gpt-4o", now=now) == 0.5
    assert snapshot.capture_rate("other", "gpt-4o", now=now) == 0.1
    assert snapshot.capture_rate("other", "claude", now=now) == 0.7
    assert snapshot.capture_rate("ci", "claude", now=now + 120) == 0.5
    assert snapshot_with().capture_rate("ci", "gpt-4o", now=now) == 0.0


def test_disabled_and_zero_rate_rules_do_not_reach_the_snapshot() -> None:
    route = RouteFactory(name="gpt-4o")
    CaptureRule.objects.create(route=route, enabled=False)
    CaptureRule.objects.create(sample_rate=0.0)
    assert routing_snapshot_sync().capture == ()
    CaptureRule.objects.create(client=ClientTokenFactory(name="ci"), sample_rate=0.3)
    from keys.routing import invalidate_routing_cache

    invalidate_routing_cache()
    assert routing_snapshot_sync().capture == (
        CaptureSpec(client="ci", route="", rate=0.3, until=None),
    )


def rule_form(**values: Any) -> dict[str, Any]:
    base = {
        "client": "",
        "route": "",
        "sample_rate": "1",
        "capture_for": "",
        "until_0": "",
        "until_1": "",
        "enabled": "on",
    }
    return {**base, **values}


def test_capturing_a_client_for_15_minutes_in_the_admin(admin_client: Client) -> None:
    token = ClientTokenFactory(name="ci")
    assert routing_snapshot_sync().capture == ()
    before = timezone.now()

    response = admin_client.post(
        reverse("admin:keys_capturerule_add"), rule_form(client=token.pk, capture_for="15")
    )

    assert response.status_code == 302, response.content.decode()[:3000]
    rule = CaptureRule.objects.get()
    assert rule.client == token and rule.route is None
    assert before + timedelta(minutes=15) <= rule.until <= timezone.now() + timedelta(minutes=15)
    [spec] = routing_snapshot_sync().capture  # the proxy sees it at once
    assert spec.client == "ci" and spec.until == rule.until.timestamp()


def test_the_admin_pages_warn_and_show_each_rules_state(admin_client: Client) -> None:
    CaptureRule.objects.create(client=ClientTokenFactory(name="ci"))
    CaptureRule.objects.create(
        route=RouteFactory(name="gpt-4o"), until=timezone.now() - timedelta(minutes=1)
    )
    listing = admin_client.get(reverse("admin:keys_capturerule_changelist")).content.decode()
    assert "capturing, no end" in listing and "ended" in listing
    add = admin_client.get(reverse("admin:keys_capturerule_add")).content.decode()
    assert "prompts and completions" in add


def test_stop_now_and_extend_actions(admin_client: Client) -> None:
    rule = CaptureRule.objects.create(client=ClientTokenFactory(name="ci"))
    url = reverse("admin:keys_capturerule_changelist")
    admin_client.post(url, {"action": "stop_now", "_selected_action": [rule.pk]})
    rule.refresh_from_db()
    assert not rule.enabled
    assert routing_snapshot_sync().capture == ()

    admin_client.post(url, {"action": "extend_15_minutes", "_selected_action": [rule.pk]})
    rule.refresh_from_db()
    assert rule.enabled and rule.until is not None
    assert rule.until > timezone.now() + timedelta(minutes=14)


def test_the_rate_is_a_share_from_0_to_1(admin_client: Client) -> None:
    response = admin_client.post(reverse("admin:keys_capturerule_add"), rule_form(sample_rate="2"))
    assert response.status_code == 200
    assert not CaptureRule.objects.exists()


def test_one_rule_per_scope_in_the_database() -> None:
    from django.db import IntegrityError, transaction

    token, route = ClientTokenFactory(name="ci"), RouteFactory(name="gpt-4o")
    for scope in ({}, {"client": token}, {"route": route}, {"client": token, "route": route}):
        CaptureRule.objects.create(**scope)
        with pytest.raises(IntegrityError), transaction.atomic():
            CaptureRule.objects.create(**scope, sample_rate=0.5)
    assert CaptureRule.objects.count() == 4
