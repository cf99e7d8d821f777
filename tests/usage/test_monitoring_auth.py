"""Every monitoring endpoint needs a staff session or a token with the `monitor` scope."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Permission, User
from django.test import Client
from django.utils import timezone

from tests.factories import ClientTokenFactory
from tests.usage import monitoring
from tests.usage.monitoring import call, write_calls

# Fixtures shared by the monitoring API tests.
api = monitoring.api
monitor_token = monitoring.monitor_token

pytestmark = pytest.mark.django_db

PATHS = [
    "/api/health",
    "/api/keys",
    "/api/config",
    "/api/usage",
    "/api/usage/models",
    "/api/usage/timeseries",
    "/api/usage/stats",
    "/api/usage/clients",
    "/api/usage/recent",
    "/api/usage/export",
    "/api/events",
    "/api/requests/req-auth",
    "/api/limits",
    # LLM Interactive Proxy's paths (usage.lip_api).
    "/v1/usage/stats",
    "/v1/usage/recent",
    "/v1/usage/export",
]


@pytest.fixture(autouse=True)
def _one_call() -> None:
    write_calls([call(request_id="req-auth", started_at=timezone.now())])


@pytest.mark.parametrize("path", PATHS)
def test_it_rejects_anonymous_callers_with_401(client: Client, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"


@pytest.mark.parametrize("path", PATHS)
def test_it_rejects_a_proxy_only_token_with_403(path: str) -> None:
    token = ClientTokenFactory(scopes=["proxy"]).raw_token
    response = Client().get(path, headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "missing_scope"


@pytest.mark.parametrize("path", PATHS)
def test_it_accepts_a_monitor_token(api: Client, path: str) -> None:
    assert api.get(path).status_code == 200


@pytest.mark.parametrize("path", PATHS)
def test_it_accepts_a_staff_session_with_the_monitoring_permission(
    client: Client, path: str
) -> None:
    staff = User.objects.create_user("staff", is_staff=True)
    staff.user_permissions.add(Permission.objects.get(codename="view_callrecord"))
    client.force_login(staff)
    assert client.get(path).status_code == 200


def test_it_rejects_a_session_without_staff_status(client: Client) -> None:
    client.force_login(User.objects.create_user("someone"))
    assert client.get("/api/usage").status_code == 401


def test_it_rejects_a_revoked_monitor_token() -> None:
    token = ClientTokenFactory(scopes=["monitor"], revoked_at=timezone.now()).raw_token
    response = Client().get("/api/usage", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "token_revoked"


def test_it_rejects_a_made_up_token() -> None:
    response = Client().get("/api/usage", headers={"Authorization": "Bearer llmr_abcdefgh_nope"})
    assert response.status_code == 401
