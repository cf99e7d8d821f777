"""Limits in the admin: their own pages, the list on a client's and a route's page, and the
provider limits of a key."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from django.test import Client
from django.urls import reverse

from keys.models import LIMIT_FIELDS, Limit
from keys.routing import routing_snapshot_sync
from tests.factories import ApiKeyFactory, ClientTokenFactory, RouteFactory

pytestmark = pytest.mark.django_db


def limit_form(**values: Any) -> dict[str, Any]:
    empty = ["client", "route", *LIMIT_FIELDS]
    return {**dict.fromkeys(empty, ""), **values}


def add_limit(browser: Client, /, **values: Any) -> Any:
    return browser.post(reverse("admin:keys_limit_add"), limit_form(**values))


def test_limit_pages_render_without_the_clients_token(admin_client: Client) -> None:
    token = ClientTokenFactory(name="ci")
    route = RouteFactory(name="gpt-4o-mini")
    limit = Limit.objects.create(client=token, route=route, requests_per_minute=60)
    Limit.objects.create(route=route, usd_per_day=Decimal("5"), max_concurrent=4)

    pages = {
        "list": admin_client.get(reverse("admin:keys_limit_changelist")),
        "add": admin_client.get(reverse("admin:keys_limit_add")),
        "change": admin_client.get(reverse("admin:keys_limit_change", args=[limit.pk])),
        "search": admin_client.get(reverse("admin:keys_limit_changelist"), {"q": "ci"}),
    }

    for name, page in pages.items():
        assert page.status_code == 200, name
        html = page.content.decode()
        assert token.raw_token not in html and token.token_hash not in html, name
    listing = pages["list"].content.decode()
    assert "60 req/min" in listing
    assert "4 concurrent, $5.00/day" in listing
    for legend in ("Requests", "Tokens", "Concurrency", "Spend (USD)"):
        assert f">{legend}<" in pages["add"].content.decode()
    assert "60 req/min" in pages["search"].content.decode()
    assert "$5.00/day" not in pages["search"].content.decode()


def test_a_limit_added_in_the_admin_is_routed_at_once(admin_client: Client) -> None:
    token = ClientTokenFactory(name="ci")
    assert routing_snapshot_sync().limits == {}  # cached, for LLMROTATE_CONFIG_CACHE_SECONDS

    response = add_limit(
        admin_client,
        client=token.pk,
        requests_per_minute="60",
        tokens_per_day="100000",
        usd_per_month="12.50",
    )

    assert response.status_code == 302, response.content.decode()[:2000]
    limit = Limit.objects.get()
    assert (limit.client, limit.route) == (token, None)
    assert (limit.requests_per_minute, limit.tokens_per_day) == (60, 100_000)
    assert limit.usd_per_month == Decimal("12.50")
    assert limit.requests_per_day is None
    assert routing_snapshot_sync().limits[("ci", "")].requests_per_minute == 60


def test_changing_and_deleting_a_limit_reach_the_routing_snapshot(admin_client: Client) -> None:
    route = RouteFactory(name="gpt-4o-mini")
    limit = Limit.objects.create(route=route, requests_per_minute=60)
    assert routing_snapshot_sync().limits[("", "gpt-4o-mini")].requests_per_minute == 60

    admin_client.post(
        reverse("admin:keys_limit_change", args=[limit.pk]),
        limit_form(route=route.pk, requests_per_minute="30"),
    )
    assert routing_snapshot_sync().limits[("", "gpt-4o-mini")].requests_per_minute == 30

    admin_client.post(reverse("admin:keys_limit_delete", args=[limit.pk]), {"post": "yes"})
    assert not Limit.objects.exists()
    assert routing_snapshot_sync().limits == {}


def test_a_limit_needs_a_client_or_a_route(admin_client: Client) -> None:
    response = add_limit(admin_client, requests_per_minute="60")

    assert response.status_code == 200
    assert "A limit applies to a client token, a route, or both." in response.content.decode()
    assert not Limit.objects.exists()


@pytest.mark.parametrize("scope", ["client", "route", "both"])
def test_a_second_limit_of_one_scope_is_refused_in_words(admin_client: Client, scope: str) -> None:
    token, route = ClientTokenFactory(name="ci"), RouteFactory(name="gpt-4o-mini")
    values = {
        "client": {"client": token},
        "route": {"route": route},
        "both": {"client": token, "route": route},
    }[scope]
    Limit.objects.create(**values, requests_per_minute=60)

    response = add_limit(admin_client, **{k: v.pk for k, v in values.items()}, max_concurrent="2")

    html = response.content.decode()
    assert response.status_code == 200
    assert "There is already a limit for" in html
    assert "Constraint" not in html, "Django's generic constraint message is not shown"
    assert Limit.objects.count() == 1


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("requests_per_minute", "0", "greater than or equal to 1"),
        ("max_concurrent", "0", "greater than or equal to 1"),
        ("tokens_per_day", "-5", "greater than or equal to 1"),
        ("usd_per_day", "-1", "greater than or equal to 0"),
        ("usd_per_month", "1.23456", "no more than 4 decimal places"),
    ],
)
def test_out_of_range_values_are_refused(
    admin_client: Client, field: str, value: str, error: str
) -> None:
    token = ClientTokenFactory(name="ci")

    response = add_limit(admin_client, client=token.pk, **{field: value})

    assert response.status_code == 200
    assert error in response.content.decode()
    assert not Limit.objects.exists()


def test_a_client_and_a_route_list_their_limits_with_links(admin_client: Client) -> None:
    token = ClientTokenFactory(name="ci")
    route = RouteFactory(name="gpt-4o-mini")
    own = Limit.objects.create(client=token, requests_per_day=1000)
    pair = Limit.objects.create(client=token, route=route, tokens_per_minute=5000)
    shared = Limit.objects.create(route=route, max_concurrent=3)

    client_page = admin_client.get(reverse("admin:keys_clienttoken_change", args=[token.pk]))
    route_page = admin_client.get(reverse("admin:keys_route_change", args=[route.pk]))

    client_html, route_html = client_page.content.decode(), route_page.content.decode()
    assert token.raw_token not in client_html and token.token_hash not in client_html
    assert reverse("admin:keys_limit_change", args=[own.pk]) in client_html
    assert reverse("admin:keys_limit_change", args=[pair.pk]) in client_html
    assert reverse("admin:keys_limit_change", args=[shared.pk]) not in client_html
    assert "1,000 req/day" in client_html
    assert f"{reverse('admin:keys_limit_add')}?client={token.pk}" in client_html
    assert reverse("admin:keys_limit_change", args=[shared.pk]) in route_html
    assert reverse("admin:keys_limit_change", args=[own.pk]) not in route_html
    assert f"{reverse('admin:keys_limit_add')}?route={route.pk}" in route_html


def test_the_add_link_of_a_client_preselects_it(admin_client: Client) -> None:
    token = ClientTokenFactory(name="ci")

    html = admin_client.get(reverse("admin:keys_limit_add"), {"client": token.pk}).content.decode()

    assert f'<option value="{token.pk}" selected>ci</option>' in html


def routed_key(key_id: str) -> Any:
    (key,) = routing_snapshot_sync().routes["gpt-4o-mini"].deployments[0].keys
    assert key.key_id == key_id
    return key


def test_a_keys_provider_limits_are_editable_and_listed(admin_client: Client) -> None:
    key = ApiKeyFactory(key_id="openai-1", priority=0, weight=1)
    RouteFactory(name="gpt-4o-mini", deployments=[(key.provider, "gpt-4o-mini")])
    assert routed_key("openai-1").rpm is None

    response = admin_client.post(
        reverse("admin:keys_apikey_change", args=[key.pk]),
        {
            "key_id": "openai-1",
            "provider": key.provider.pk,
            "secret": "",
            "enabled": "on",
            "priority": "0",
            "weight": "1",
            "allowed_models": "",
            "requests_per_minute": "500",
            "tokens_per_minute": "200000",
        },
    )

    assert response.status_code == 302, response.content.decode()[:2000]
    key.refresh_from_db()
    assert (key.requests_per_minute, key.tokens_per_minute) == (500, 200_000)
    routed = routed_key("openai-1")
    assert (routed.rpm, routed.tpm) == (500, 200_000)
    change = admin_client.get(reverse("admin:keys_apikey_change", args=[key.pk])).content.decode()
    listing = admin_client.get(reverse("admin:keys_apikey_changelist")).content.decode()
    assert ">Provider limits<" in change
    assert 'name="requests_per_minute" value="500"' in change
    assert "500 req/min, 200,000 tok/min" in listing
    for html in (change, listing):
        assert key.raw_secret not in html and key.secret_encrypted not in html


def test_a_keys_provider_limits_must_be_positive(admin_client: Client) -> None:
    key = ApiKeyFactory(key_id="openai-1")

    response = admin_client.post(
        reverse("admin:keys_apikey_change", args=[key.pk]),
        {
            "key_id": "openai-1",
            "provider": key.provider.pk,
            "enabled": "on",
            "priority": "0",
            "weight": "1",
            "requests_per_minute": "0",
        },
    )

    assert response.status_code == 200
    assert "greater than or equal to 1" in response.content.decode()
    key.refresh_from_db()
    assert key.requests_per_minute is None
