"""Replacement rules in the admin: added, listed, refused in words, switched on and off, each
write reaching the routing snapshot at once; and a client token's `never_replace`."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from keys.models import ClientToken, ReplacementRule
from keys.routing import routing_snapshot_sync
from tests.factories import ClientTokenFactory, ProviderFactory, RouteFactory

pytestmark = pytest.mark.django_db

ADD = "admin:keys_replacementrule_add"
LIST = "admin:keys_replacementrule_changelist"


def rule_form(**values: Any) -> dict[str, Any]:
    """The add form as a browser posts it: the model's defaults, then `values`."""
    form = {
        "name": "",
        "route": "",
        "position": "0",
        "target_provider": "",
        "target_model": "",
        "target_route": "",
        "probability": "0.1",
        "stickiness": "per_request",
        "sticky_turns": "10",
        "min_turn": "0",
        "clients": "",
        "seed": "",
        "enabled": "on",
        "active_from_0": "",
        "active_from_1": "",
        "active_until_0": "",
        "active_until_1": "",
    }
    return {**form, **values}


@pytest.fixture
def routes() -> dict[str, Any]:
    local = ProviderFactory(name="local")
    return {
        "mini": RouteFactory(name="gpt-4o-mini"),
        "llama": RouteFactory(name="llama", deployments=[(local, "llama3.2")]),
        "pattern": RouteFactory(name="ollama/*", deployments=[(local, "*")]),
        "local": local,
    }


def test_a_rule_added_in_the_admin_is_listed_and_routed_at_once(
    admin_client: Client, routes: dict[str, Any]
) -> None:
    ClientTokenFactory(name="ci")
    assert routing_snapshot_sync().replacements == {}  # cached until a write drops it

    response = admin_client.post(
        reverse(ADD),
        rule_form(
            name="mini-to-llama",
            route=routes["mini"].pk,
            target_provider=routes["local"].pk,
            target_model="llama3.2",
            probability="0.25",
            stickiness="per_session",
            clients="ci",
            without_tools="on",
            active_until_0="2099-01-01",
            active_until_1="00:00:00",
        ),
    )

    assert response.status_code == 302, response.content.decode()[:3000]
    rule = ReplacementRule.objects.get()
    assert (rule.name, rule.route, rule.target_model) == (
        "mini-to-llama",
        routes["mini"],
        "llama3.2",
    )
    assert (rule.probability, rule.stickiness, rule.clients) == (0.25, "per_session", ["ci"])
    assert rule.without_tools and not rule.without_images
    [spec] = routing_snapshot_sync().replacements["gpt-4o-mini"]
    assert (spec.name, spec.probability, spec.target) == ("mini-to-llama", 0.25, "local/llama3.2")
    listing = admin_client.get(reverse(LIST)).content.decode()
    for text in ("mini-to-llama", "local/llama3.2", "0.25", "per session", "2099-01-01"):
        assert text in listing, text


def test_the_add_page_says_what_an_experiment_does(admin_client: Client) -> None:
    html = admin_client.get(reverse(ADD)).content.decode()

    assert "An experiment sends a share of a route" in html
    assert "docs/replacement.md" in html
    for legend in ("Target", "Draw", "Conditions"):
        assert f">{legend}<" in html


@pytest.mark.parametrize(
    ("values", "error"),
    [
        ({}, "Choose a target: a provider and model, or another route."),
        ({"target_route": "mini"}, "A rule cannot point at its own route."),
        ({"target_route": "pattern"}, "The target route must be an exact route, not a pattern."),
        (
            {"target_route": "llama", "target_provider": "local", "target_model": "x"},
            "Choose one target: a provider and model, or a route.",
        ),
        ({"target_provider": "local"}, "A provider target needs the model to send it."),
        ({"target_route": "llama", "probability": "1.5"}, "less than or equal to 1.0"),
        ({"target_route": "llama", "clients": "ci, nobody"}, "Unknown client: nobody."),
        (
            {
                "target_route": "llama",
                "active_from_0": "2030-01-02",
                "active_from_1": "00:00:00",
                "active_until_0": "2030-01-01",
                "active_until_1": "00:00:00",
            },
            "The window ends before it starts.",
        ),
    ],
)
def test_an_invalid_rule_shows_the_error_on_the_form(
    admin_client: Client, routes: dict[str, Any], values: dict[str, str], error: str
) -> None:
    ClientTokenFactory(name="ci")
    posted = {k: routes[v].pk if v in routes else v for k, v in values.items()}

    response = admin_client.post(
        reverse(ADD), rule_form(name="bad", route=routes["mini"].pk, **posted)
    )

    assert response.status_code == 200
    html = response.content.decode()
    assert error in html
    assert "errorlist" in html
    assert not ReplacementRule.objects.exists()


def rule(routes: dict[str, Any], name: str, *, enabled: bool) -> ReplacementRule:
    return ReplacementRule.objects.create(
        name=name, route=routes["mini"], target_route=routes["llama"], enabled=enabled
    )


def routed(name: str) -> bool:
    return name in {s.name for s in routing_snapshot_sync().replacements.get("gpt-4o-mini", ())}


def test_the_enable_and_disable_actions_reach_the_routing_snapshot(
    admin_client: Client, routes: dict[str, Any]
) -> None:
    on, off = rule(routes, "on", enabled=True), rule(routes, "off", enabled=False)
    assert routed("on") and not routed("off")

    admin_client.post(reverse(LIST), {"action": "disable_rules", "_selected_action": [on.pk]})

    assert not ReplacementRule.objects.get(pk=on.pk).enabled
    assert not routed("on")

    response = admin_client.post(
        reverse(LIST), {"action": "enable_rules", "_selected_action": [on.pk, off.pk]}, follow=True
    )

    assert "2 replacement rule(s) enabled." in response.content.decode()
    assert set(ReplacementRule.objects.values_list("enabled", flat=True)) == {True}
    assert routed("on") and routed("off")


def test_changing_and_deleting_a_rule_reach_the_routing_snapshot(
    admin_client: Client, routes: dict[str, Any]
) -> None:
    saved = rule(routes, "exp", enabled=True)
    assert routing_snapshot_sync().replacements["gpt-4o-mini"][0].probability == 0.1

    response = admin_client.post(
        reverse("admin:keys_replacementrule_change", args=[saved.pk]),
        rule_form(
            name="exp", route=routes["mini"].pk, target_route=routes["llama"].pk, probability="0.5"
        ),
    )

    assert response.status_code == 302, response.content.decode()[:3000]
    assert routing_snapshot_sync().replacements["gpt-4o-mini"][0].probability == 0.5

    admin_client.post(
        reverse("admin:keys_replacementrule_delete", args=[saved.pk]), {"post": "yes"}
    )

    assert not ReplacementRule.objects.exists()
    assert routing_snapshot_sync().replacements == {}


def test_the_list_shows_each_rules_window(admin_client: Client, routes: dict[str, Any]) -> None:
    now = timezone.now()
    ReplacementRule.objects.create(
        name="ended",
        route=routes["mini"],
        target_route=routes["llama"],
        active_until=now - timedelta(hours=1),
    )
    ReplacementRule.objects.create(
        name="soon",
        route=routes["mini"],
        target_route=routes["llama"],
        active_from=now + timedelta(days=2, minutes=5),
    )
    rule(routes, "open", enabled=True)

    html = admin_client.get(reverse(LIST)).content.decode()

    assert "(ended)" in html
    assert "(starts in 2\xa0days)" in html
    assert ">always<" in html


def token_form(**values: Any) -> dict[str, Any]:
    return {"name": "ci", "routes": "*", "scopes": ["proxy"], **values}


def test_a_client_tokens_never_replace_is_shown_and_edited(admin_client: Client) -> None:
    response = admin_client.post(
        reverse("admin:keys_clienttoken_add"), token_form(never_replace="on")
    )
    assert response.status_code == 302, response.content.decode()[:3000]
    token = ClientToken.objects.get(name="ci")
    assert token.never_replace
    assert routing_snapshot_sync().tokens[token.prefix].never_replace

    change = reverse("admin:keys_clienttoken_change", args=[token.pk])
    assert 'name="never_replace"' in admin_client.get(change).content.decode()
    response = admin_client.post(change, token_form())  # the box unticked

    assert response.status_code == 302, response.content.decode()[:3000]
    token.refresh_from_db()
    assert not token.never_replace
    assert not routing_snapshot_sync().tokens[token.prefix].never_replace
    listing = admin_client.get(reverse("admin:keys_clienttoken_changelist")).content.decode()
    assert "never replace" in listing.lower()
