"""GET /api/limits: every limit with what is used of it now, the keys' own limits, and each
client's spend against its budget. Both legs (memory limiter and SQLite; Redis and Postgres)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from django.contrib.auth.models import Permission, User
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from keys.limits import (
    Estimate,
    Lease,
    Meter,
    Reading,
    get_limiter,
    key_meters,
    spec_lease,
    spec_meters,
    usd_units,
)
from keys.models import ClientToken, Limit
from keys.routing import routing_snapshot_sync
from tests.factories import ApiKeyFactory, ClientTokenFactory, ProviderFactory, RouteFactory
from tests.usage import monitoring
from tests.usage.monitoring import call, write_calls
from usage import limit_selectors
from usage.limit_selectors import period_starts
from usage.models import CallRecord

api = monitoring.api
monitor_token = monitoring.monitor_token

pytestmark = pytest.mark.django_db


class Gateway:
    """A provider with a rate-limited key (and one without), a route, two clients with limits
    of their own, a limit on the route, and a pair limit."""

    def __init__(self) -> None:
        provider = ProviderFactory(name="openai-main")
        self.key = ApiKeyFactory(
            key_id="openai-1", provider=provider, requests_per_minute=500, tokens_per_minute=20_000
        )
        self.plain_key = ApiKeyFactory(key_id="openai-2", provider=provider)
        self.route = RouteFactory(name="gpt-4o-mini", deployments=[(provider, "gpt-4o-mini")])
        self.app = ClientTokenFactory(name="app")
        self.ci = ClientTokenFactory(name="ci")
        self.app_limit = Limit.objects.create(
            client=self.app,
            requests_per_minute=60,
            usd_per_day=Decimal("5.00"),
            usd_per_month=Decimal("100"),
            max_concurrent=4,
        )
        self.route_limit = Limit.objects.create(route=self.route, tokens_per_minute=100_000)
        self.pair_limit = Limit.objects.create(
            client=self.ci, route=self.route, requests_per_day=1000
        )


@pytest.fixture
def gateway() -> Gateway:
    return Gateway()


def limits_by_id(body: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {entry["id"]: entry for entry in body["limits"]}


def meter(entry: dict[str, Any], kind: str, period: str) -> dict[str, Any]:
    found = [m for m in entry["meters"] if (m["kind"], m["period"]) == (kind, period)]
    assert len(found) == 1, entry["meters"]
    return found[0]


def reserve(meters: Sequence[Meter], leases: Sequence[Lease] = ()) -> None:
    """Reserve through the limiter the proxy uses, as an admitted request does."""

    async def run() -> None:
        limiter = get_limiter()
        try:
            decision = await limiter.reserve(
                meters, leases, lease_id="test-request", lease_until=time.time() + 300
            )
            assert decision.allowed, decision
        finally:
            aclose = getattr(limiter, "aclose", None)  # the Redis client of this short loop
            if aclose is not None:
                await aclose()

    asyncio.run(run())


def clear_of_the_minute_end(margin: float = 5.0) -> None:
    """Per-minute counters start again each minute: wait (bounded) until the reservation and
    the read fall in the same one."""
    deadline = time.monotonic() + margin + 1
    while time.time() % 60 > 60 - margin:
        assert time.monotonic() < deadline, "the clock did not move on"
        time.sleep(0.05)


def test_it_answers_every_limit_in_a_stable_shape(api: Client, gateway: Gateway) -> None:
    before = datetime.now(UTC)
    response = api.get("/api/limits")
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"time_zone", "limits", "keys", "clients", "store_error"}
    assert body["time_zone"] == "UTC"
    assert body["store_error"] is False

    # Clients first (by name, then route), then route-only limits.
    assert [(e["client"], e["route"]) for e in body["limits"]] == [
        ("app", None),
        ("ci", "gpt-4o-mini"),
        (None, "gpt-4o-mini"),
    ]
    app = limits_by_id(body)[gateway.app_limit.pk]
    assert set(app) == {"id", "client", "route", "meters", "concurrency"}
    assert [(m["kind"], m["period"]) for m in app["meters"]] == [
        ("requests", "minute"),
        ("usd", "day"),
        ("usd", "month"),
    ]
    for m in app["meters"]:
        assert set(m) == {"kind", "period", "limit", "used", "remaining", "resets_at"}
        assert m["used"] == 0
        assert m["remaining"] == m["limit"]
        resets_at = datetime.fromisoformat(m["resets_at"].replace("Z", "+00:00"))
        assert resets_at.utcoffset() == timedelta(0)
        assert resets_at > before
    assert meter(app, "requests", "minute")["limit"] == 60
    assert meter(app, "usd", "day")["limit"] == 5.0  # dollars, as a JSON number
    assert meter(app, "usd", "month")["limit"] == 100.0
    assert app["concurrency"] == {"limit": 4, "in_flight": 0}

    route = limits_by_id(body)[gateway.route_limit.pk]
    assert route["concurrency"] is None
    assert [(m["kind"], m["period"], m["limit"]) for m in route["meters"]] == [
        ("tokens", "minute", 100_000)
    ]
    # Only the key that has provider limits.
    assert [(k["key_id"], k["provider"]) for k in body["keys"]] == [("openai-1", "openai-main")]
    key = body["keys"][0]
    assert set(key) == {"key_id", "provider", "meters"}
    assert [(m["kind"], m["period"], m["limit"], m["used"]) for m in key["meters"]] == [
        ("requests", "minute", 500, 0),
        ("tokens", "minute", 20_000, 0),
    ]
    # Every client token, budgets from its own limit.
    clients = {c["client"]: c for c in body["clients"]}
    assert set(clients) == {"app", "ci", "monitoring"}
    assert clients["app"]["budget_usd"] == {"day": 5.0, "month": 100.0}
    assert clients["ci"]["budget_usd"] == {"day": None, "month": None}
    assert clients["ci"]["spend_usd"] == {"day": 0.0, "month": 0.0}


def test_windows_end_at_the_minute_and_at_midnight_of_the_limits_time_zone(
    api: Client, gateway: Gateway, settings: Any
) -> None:
    settings.LLMROTATE_LIMITS_TIME_ZONE = "Asia/Kolkata"  # +05:30: days end off the UTC hour
    now = timezone.now()
    body = api.get("/api/limits").json()
    assert body["time_zone"] == "Asia/Kolkata"
    app = limits_by_id(body)[gateway.app_limit.pk]
    day_start, month_start = period_starts(now, "Asia/Kolkata")
    resets = {
        (m["kind"], m["period"]): datetime.fromisoformat(m["resets_at"].replace("Z", "+00:00"))
        for m in app["meters"]
    }
    assert resets["usd", "day"] == day_start + timedelta(days=1)
    assert (resets["usd", "day"].hour, resets["usd", "day"].minute) == (18, 30)  # UTC
    minute_end = resets["requests", "minute"]
    assert minute_end.second == 0 and timedelta(0) < minute_end - now <= timedelta(minutes=1)
    local = month_start.astimezone(ZoneInfo("Asia/Kolkata"))
    year, month = (local.year + 1, 1) if local.month == 12 else (local.year, local.month + 1)
    assert resets["usd", "month"] == datetime(year, month, 1, tzinfo=ZoneInfo("Asia/Kolkata"))


def test_it_shows_what_requests_reserved_and_hold(api: Client, gateway: Gateway) -> None:
    clear_of_the_minute_end()
    now = time.time()
    spec = routing_snapshot_sync().limits[("app", "")]
    lease = spec_lease(spec)
    assert lease is not None
    reserve(
        spec_meters(
            spec, Estimate(tokens=500, usd=usd_units(Decimal("1.25"))), now=now, zone="UTC"
        ),
        [lease],
    )
    reserve(key_meters("openai-1", rpm=500, tpm=20_000, tokens=700, now=now))
    reserve(key_meters("openai-1", rpm=500, tpm=20_000, tokens=300, now=now))

    body = api.get("/api/limits").json()
    app = limits_by_id(body)[gateway.app_limit.pk]
    requests = meter(app, "requests", "minute")
    assert (requests["used"], requests["remaining"]) == (1, 59)
    usd_day = meter(app, "usd", "day")
    assert (usd_day["used"], usd_day["remaining"]) == (1.25, 3.75)
    assert meter(app, "usd", "month")["used"] == 1.25
    assert app["concurrency"] == {"limit": 4, "in_flight": 1}
    # Other limits are counted apart.
    ci = limits_by_id(body)[gateway.pair_limit.pk]
    assert meter(ci, "requests", "day")["used"] == 0
    key = body["keys"][0]
    assert meter(key, "requests", "minute")["used"] == 2
    tokens = meter(key, "tokens", "minute")
    assert (tokens["used"], tokens["remaining"]) == (1000, 19_000)


def test_remaining_never_goes_below_zero(api: Client, gateway: Gateway) -> None:
    spec = routing_snapshot_sync().limits[("app", "")]
    (usd_day,) = [m for m in spec_meters(spec, Estimate(), now=time.time(), zone="UTC")
                  if m.period == "day"]  # fmt: skip
    reserve([dataclasses.replace(usd_day, amount=usd_day.limit)])
    # Settled from what the call cost: $2 more than the whole budget it reserved.
    get_limiter().settle([usd_day.settled(usd_units(Decimal("2")))])
    body = api.get("/api/limits").json()
    m = meter(limits_by_id(body)[gateway.app_limit.pk], "usd", "day")
    assert (m["used"], m["remaining"]) == (7.0, 0)


def test_client_spend_comes_from_the_recorded_cost_of_this_day_and_month(
    api: Client, gateway: Gateway, settings: Any
) -> None:
    settings.LLMROTATE_LIMITS_TIME_ZONE = "Asia/Kolkata"
    now = timezone.now()
    day_start, month_start = period_starts(now, "Asia/Kolkata")
    yesterday_late = day_start - timedelta(minutes=1)
    write_calls(
        [
            call(client="app", started_at=now - timedelta(seconds=1), cost_usd=Decimal("0.50")),
            call(client="app", started_at=yesterday_late, cost_usd=Decimal("0.25")),
            call(client="app", started_at=month_start - timedelta(hours=2), cost_usd=Decimal("8")),
            call(client="ci", started_at=now - timedelta(seconds=1), cost_usd=Decimal("0.125")),
        ]
    )
    clients = {c["client"]: c for c in api.get("/api/limits").json()["clients"]}
    month = 0.5 + (0.25 if yesterday_late >= month_start else 0)
    assert clients["app"]["spend_usd"] == {"day": 0.5, "month": pytest.approx(month)}
    assert clients["ci"]["spend_usd"] == {"day": 0.125, "month": 0.125}


def test_an_unreadable_store_says_so_instead_of_showing_zeros(
    api: Client, gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Unreachable:
        def read(self, keys: Sequence[str], lease_keys: Sequence[str], *, now: float) -> Reading:
            return Reading(error=True)

    monkeypatch.setattr(limit_selectors, "get_limiter", Unreachable)
    body = api.get("/api/limits").json()
    assert body["store_error"] is True
    app = limits_by_id(body)[gateway.app_limit.pk]
    assert all(m["used"] is None and m["remaining"] is None for m in app["meters"])
    assert app["concurrency"] == {"limit": 4, "in_flight": None}
    assert meter(app, "usd", "day")["limit"] == 5.0


def test_without_limits_the_lists_are_empty(api: Client) -> None:
    body = api.get("/api/limits").json()
    assert body["limits"] == [] and body["keys"] == []
    assert [c["client"] for c in body["clients"]] == ["monitoring"]


def test_it_rejects_anonymous_callers_with_401(client: Client) -> None:
    response = client.get("/api/limits")
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"


def test_it_rejects_a_proxy_only_token_with_403(gateway: Gateway) -> None:
    response = Client().get(
        "/api/limits", headers={"Authorization": f"Bearer {gateway.app.raw_token}"}
    )
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "missing_scope"


def test_staff_need_the_monitoring_permission(client: Client) -> None:
    staff = User.objects.create_user("staff", is_staff=True)
    client.force_login(staff)
    assert client.get("/api/limits").status_code == 403
    staff.user_permissions.add(Permission.objects.get(codename="view_callrecord"))
    client.force_login(User.objects.get(pk=staff.pk))  # permissions are cached per user object
    assert client.get("/api/limits").status_code == 200


def test_no_secret_or_token_is_in_the_answer(
    api: Client, gateway: Gateway, monitor_token: str
) -> None:
    text = api.get("/api/limits").content.decode()
    assert gateway.key.raw_secret not in text
    assert gateway.key.raw_secret[-8:] not in text
    for token in (gateway.app.raw_token, gateway.ci.raw_token, monitor_token):
        assert token not in text
    for stored in ClientToken.objects.all():
        assert stored.token_hash not in text
        assert stored.prefix not in text


def test_spend_is_read_from_rollups_never_from_call_records(api: Client, gateway: Gateway) -> None:
    write_calls([call(client="app", started_at=timezone.now(), cost_usd=Decimal("0.5"))])
    with CaptureQueriesContext(connection) as queries:
        body = api.get("/api/limits").json()
    assert {c["client"]: c["spend_usd"]["day"] for c in body["clients"]}["app"] == 0.5
    sql = " ".join(q["sql"] for q in queries.captured_queries)
    assert "rollup" in sql
    assert CallRecord._meta.db_table not in sql
