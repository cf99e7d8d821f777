"""The proxy keeps serving when the database or Redis goes away."""

from __future__ import annotations

import json
import time

import pytest
from django.db.utils import OperationalError
from django.test import AsyncClient

from tests.proxy.conftest import Gateway

pytestmark = pytest.mark.asyncio
BODY = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})


async def post(gateway: Gateway):
    return await AsyncClient().post(
        "/v1/chat/completions",
        data=BODY,
        content_type="application/json",
        headers=gateway.headers(),
    )


async def test_it_serves_from_the_cached_config_while_the_database_is_down(gateway, monkeypatch):
    from keys import routing

    assert (await post(gateway)).status_code == 200
    loads: list[float] = []

    def database_down():
        loads.append(time.monotonic())
        raise OperationalError("could not connect to server")

    monkeypatch.setattr("keys.routing.routing_load", database_down)
    # Older than two TTLs: the request itself must try to reload before it is answered.
    assert routing._snapshot is not None
    routing._snapshot.loaded_at -= 3600
    assert (await post(gateway)).status_code == 200
    assert loads, "the request was answered without the reload being tried"
    # And while reloads keep failing (retried in the background), it keeps serving.
    assert (await post(gateway)).status_code == 200


async def test_without_any_cached_config_a_database_outage_is_a_503(gateway, monkeypatch):
    from keys.routing import invalidate_routing_cache

    def database_down():
        raise OperationalError("could not connect to server at 10.0.0.7")

    invalidate_routing_cache()
    monkeypatch.setattr("keys.routing.routing_load", database_down)
    response = await post(gateway)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "config_unavailable"
    assert int(response["Retry-After"]) >= 1
    assert "10.0.0.7" not in response.content.decode()


async def test_it_keeps_routing_when_redis_goes_away(gateway, settings):
    from keys.state_store import reset_key_state_store

    # A Redis URL nobody listens on: the store falls back to per-process state.
    settings.REDIS_URL = "redis://127.0.0.1:1/0"
    reset_key_state_store()
    for _ in range(3):
        assert (await post(gateway)).status_code == 200
