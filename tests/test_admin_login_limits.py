"""Failed admin logins are logged and counted per client address (django-axes): after
LLMROTATE_LOGIN_FAILURE_LIMIT (5) failures the address is refused, right password or not, while
other addresses log in as usual. Django's test client, through the real login view."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from django.conf import settings as django_settings
from django.contrib.auth.models import User
from django.test import Client

pytestmark = pytest.mark.django_db

PASSWORD = "correct-horse-battery-staple"
WRONG = "wrong-password-0123456789"
ATTACKER = "203.0.113.7"
COLLEAGUE = "198.51.100.20"


@pytest.fixture(autouse=True)
def admin_user(settings: Any) -> User:
    # A fast hasher: each login checks a password, and the default one takes a good part of a
    # second on purpose.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    return User.objects.create_superuser("ops", "ops@example.com", PASSWORD)


def log_in(address: str, password: str, username: str = "ops") -> tuple[Client, int]:
    browser = Client(REMOTE_ADDR=address)
    response = browser.post(
        "/admin/login/?next=/admin/",
        {"username": username, "password": password, "next": "/admin/"},
    )
    return browser, response.status_code


def logged_in(browser: Client) -> bool:
    return browser.get("/admin/").status_code == 200


def test_the_defaults_are_five_failures_and_fifteen_minutes() -> None:
    assert django_settings.AXES_FAILURE_LIMIT == 5
    assert django_settings.AXES_COOLOFF_TIME.total_seconds() == 15 * 60


def test_the_sixth_login_from_an_address_is_refused_even_with_the_right_password_not_others() -> (
    None
):
    statuses = [log_in(ATTACKER, WRONG)[1] for _ in range(5)]
    # The form answers the first four; the fifth failure locks the address.
    assert statuses == [200, 200, 200, 200, 403]

    browser = Client(REMOTE_ADDR=ATTACKER)
    refused = browser.post(
        "/admin/login/?next=/admin/",
        {"username": "ops", "password": PASSWORD, "next": "/admin/"},
    )

    assert refused.status_code == 403
    assert "Too many failed logins from your address" in refused.content.decode()
    assert not logged_in(browser)
    # Another address is unaffected.
    colleague, status = log_in(COLLEAGUE, PASSWORD)
    assert status == 302
    assert logged_in(colleague)


def test_failed_logins_are_logged_with_address_and_username_never_the_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="axes"):
        for _ in range(5):
            log_in(ATTACKER, WRONG, username="root")

    lines = [r.getMessage() for r in caplog.records if r.name.startswith("axes")]
    failures = [line for line in lines if "login failure by" in line]
    assert len(failures) == 5
    assert all(ATTACKER in line and 'username: "root"' in line for line in failures)
    assert any("Locking out" in line and ATTACKER in line for line in lines)
    assert not any(WRONG in r.getMessage() for r in caplog.records)
