from __future__ import annotations

import pytest
from django.test import AsyncClient

from tests.proxy.conftest import Gateway

pytestmark = pytest.mark.asyncio


async def test_it_lists_only_the_routes_the_token_may_use(gateway: Gateway):
    response = await AsyncClient().get("/v1/models", headers=gateway.headers())
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    assert sorted(m["id"] for m in body["data"]) == ["gpt-4o-mini", "with-fallback"]


async def test_it_needs_a_token(gateway: Gateway):
    response = await AsyncClient().get("/v1/models")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "missing_api_key"
