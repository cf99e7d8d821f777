"""GET /healthz: the gateway's own liveness, each part named when it fails."""

from __future__ import annotations

import time
from unittest import mock

import pytest
from django.test import Client, override_settings

from tests.conftest import free_port

pytestmark = pytest.mark.django_db


def test_healthz_reports_each_part_ok_when_all_is_well(client: Client, settings):
    response = client.get("/healthz")
    assert response.status_code == 200
    expected = {"database": "ok", "broker": "ok"} | ({"redis": "ok"} if settings.REDIS_URL else {})
    assert response.json() == {"status": "ok", "checks": expected, "failing": []}


def test_healthz_names_a_database_failure(client: Client):
    from django.db import OperationalError, connections

    refused = OperationalError("connection to server at 10.0.0.5 failed: Connection refused")
    wrapper = type(connections["default"])  # the check runs in a thread of its own
    with mock.patch.object(wrapper, "ensure_connection", side_effect=refused):
        response = client.get("/healthz")
    assert response.status_code == 503
    body = response.json()
    assert body["failing"] == ["database"]
    assert body["checks"]["database"] == "failed: OperationalError"
    assert body["checks"]["broker"] == "ok"
    assert "10.0.0.5" not in response.content.decode()


def test_healthz_names_a_broker_failure(client: Client, settings, tmp_path):
    from llmrotate_site.celery import app

    if settings.REDIS_URL:  # the broker is Redis: point it at a port nobody listens on
        original = app.conf.broker_url
        app.conf.broker_url = f"redis://127.0.0.1:{free_port()}/0"
        try:
            response = client.get("/healthz")
        finally:
            app.conf.broker_url = original
    else:  # the embedded broker: its folder cannot be written
        options = dict(settings.CELERY_BROKER_TRANSPORT_OPTIONS)
        options["data_folder_out"] = str(tmp_path / "missing")
        with override_settings(CELERY_BROKER_TRANSPORT_OPTIONS=options):
            response = client.get("/healthz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "fail" and body["failing"] == ["broker"]
    assert body["checks"]["broker"] in ("timed out", "failed: PermissionError")
    assert body["checks"]["database"] == "ok"


def test_healthz_names_the_failing_part_and_answers_fast(client: Client, settings, tmp_path):
    options = dict(settings.CELERY_BROKER_TRANSPORT_OPTIONS)
    options["data_folder_out"] = str(tmp_path / "missing")
    broken = {
        "REDIS_URL": "redis://127.0.0.1:1/0",
        "CELERY_BROKER_TRANSPORT_OPTIONS": options,
    }
    t0 = time.monotonic()
    with override_settings(**broken):
        response = client.get("/healthz")
    assert time.monotonic() - t0 < 3
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "fail" and "redis" in body["failing"]
    assert body["checks"]["database"] == "ok"
    assert "127.0.0.1:1" not in response.content.decode()
