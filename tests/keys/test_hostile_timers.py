"""A key whose stored timer lies past the year 9999 (set by a hostile Retry-After before waits
were clamped) can still be shown everywhere: the monitoring API, the dashboard, the admin."""

from __future__ import annotations

import asyncio
import time

import pytest
from django.test import Client

from keys.health import CallResult, KeyPolicy, Outcome
from keys.state_store import get_key_state_store
from tests.factories import ApiKeyFactory, ClientTokenFactory, ProviderFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def benched_for_ever() -> str:
    key = ApiKeyFactory(key_id="far-1", provider=ProviderFactory(name="openai"))
    store = get_key_state_store()
    # What a store held before waits were clamped: a policy without the bound.
    unbounded = KeyPolicy(max_wait_seconds=float("inf"))
    now = time.time()
    for outcome, wait in ((Outcome.RATE_LIMITED, 3e11), (Outcome.QUOTA_EXHAUSTED, 1e308)):
        asyncio.run(
            store.record(
                key.key_id, CallResult(outcome, now=now, policy=unbounded, retry_after=wait)
            )
        )
    state, _ = store.get_many([key.key_id], now=now)[key.key_id]
    assert state.exhausted_until >= 1e308
    return key.key_id


def test_the_monitoring_api_shows_the_key(client: Client, benched_for_ever: str) -> None:
    token = ClientTokenFactory(scopes=["monitor"]).raw_token
    for path in ("/api/keys", "/api/health"):
        response = client.get(path, headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 200, (path, response.content[:300])
    [key] = client.get("/api/keys", headers={"Authorization": f"Bearer {token}"}).json()["keys"]
    assert key["cooldown_until"].startswith("9999-12-31")


@pytest.mark.parametrize("path", ["/dashboard/", "/dashboard/keys/", "/admin/keys/apikey/"])
def test_the_dashboard_and_the_admin_show_the_key(
    admin_client: Client, benched_for_ever: str, path: str
) -> None:
    assert admin_client.get(path).status_code == 200
