"""A staff session reads the monitoring API only with the `usage.view_callrecord` permission
(superusers have every permission); a `monitor` token is unaffected by it."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Group, Permission, User
from django.test import Client
from django.utils import timezone

from tests.usage import monitoring
from tests.usage.monitoring import call, write_calls
from tests.usage.test_monitoring_auth import PATHS

monitor_token = monitoring.monitor_token

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _one_call() -> None:
    write_calls([call(request_id="req-auth", started_at=timezone.now())])


def session(user: User) -> Client:
    client = Client()
    client.force_login(user)
    return client


@pytest.mark.parametrize("path", PATHS)
def test_staff_need_the_view_call_record_permission(path: str) -> None:
    clerk = User.objects.create_user("clerk", is_staff=True)
    clerk.user_permissions.add(Permission.objects.get(codename="view_apikey"))
    refused = session(clerk).get(path)
    assert refused.status_code == 403
    error = refused.json()["error"]
    assert error["code"] == "missing_permission"
    assert "usage.view_callrecord" in error["message"]

    # Given through a group, as an admin would.
    analysts = Group.objects.create(name="analysts")
    analysts.permissions.add(Permission.objects.get(codename="view_callrecord"))
    clerk.groups.add(analysts)
    assert session(clerk).get(path).status_code == 200


def test_superusers_need_no_grant_and_a_monitor_token_still_decides(monitor_token: str) -> None:
    clerk = session(User.objects.create_user("clerk", is_staff=True))
    assert clerk.get("/api/usage").status_code == 403
    with_token = clerk.get("/api/usage", headers={"Authorization": f"Bearer {monitor_token}"})
    assert with_token.status_code == 200
    root = User.objects.create_superuser("root", "root@example.com", "pw")
    assert session(root).get("/api/usage").status_code == 200
