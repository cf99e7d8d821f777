"""GET /v1/models for the anthropic SDK: Anthropic's list shape and paging, same tokens."""

from __future__ import annotations

import re

import pytest
from django.test import AsyncClient

from tests.proxy.conftest import AnthropicGateway, Gateway

pytestmark = pytest.mark.asyncio

# The anthropic_gateway's routes, by name: /v1/messages answers every one of them (gpt-only,
# which has no Anthropic deployment, through chat completions).
ROUTES = ["claude", "gpt-first", "gpt-only"]


async def models(gateway: Gateway, query: str = "", **headers: str) -> dict:
    response = await AsyncClient().get(
        f"/v1/models{query}", headers={**gateway.headers(), **headers}
    )
    assert response.status_code == 200, response.content
    return response.json()


async def test_an_anthropic_client_gets_anthropics_list_shape(anthropic_gateway):
    body = await models(anthropic_gateway)
    assert [m["id"] for m in body["data"]] == ROUTES
    first = body["data"][0]
    assert set(first) == {"type", "id", "display_name", "created_at"}
    assert (first["type"], first["display_name"]) == ("model", "claude")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", first["created_at"])
    assert (body["has_more"], body["first_id"], body["last_id"]) == (False, "claude", "gpt-only")
    assert anthropic_gateway.upstream.requests == []


async def test_it_pages_like_anthropic(anthropic_gateway):
    first = await models(anthropic_gateway, "?limit=1")
    assert [m["id"] for m in first["data"]] == ["claude"]
    assert first["has_more"] is True
    rest = await models(anthropic_gateway, f"?limit=2&after_id={first['last_id']}")
    assert [m["id"] for m in rest["data"]] == ["gpt-first", "gpt-only"]
    assert rest["has_more"] is False
    back = await models(anthropic_gateway, "?limit=1&before_id=gpt-first")
    assert [m["id"] for m in back["data"]] == ["claude"] and back["has_more"] is False


async def test_both_shapes_list_the_same_routes(anthropic_gateway):
    anthropic_ids = [m["id"] for m in (await models(anthropic_gateway))["data"]]
    response = await AsyncClient().get(
        "/v1/models", headers={"Authorization": f"Bearer {anthropic_gateway.token}"}
    )
    openai_ids = [m["id"] for m in response.json()["data"]]
    assert anthropic_ids == openai_ids == ROUTES


async def test_a_bearer_token_with_the_anthropic_version_header_gets_anthropics_shape(
    anthropic_gateway: AnthropicGateway,
):
    response = await AsyncClient().get(
        "/v1/models",
        headers={
            "Authorization": f"Bearer {anthropic_gateway.token}",
            "anthropic-version": "2023-06-01",
        },
    )
    assert "has_more" in response.json()


async def test_an_openai_client_still_gets_openais_shape(gateway: Gateway):
    body = await models(gateway)
    assert body["object"] == "list" and "has_more" not in body


async def test_a_bad_limit_is_a_400_in_anthropics_envelope(anthropic_gateway):
    response = await AsyncClient().get("/v1/models?limit=0", headers=anthropic_gateway.headers())
    assert response.status_code == 400
    assert response.json()["type"] == "error"
    assert response.json()["error"]["param"] == "limit"


async def test_a_wrong_x_api_key_is_a_401_in_anthropics_envelope(anthropic_gateway):
    response = await AsyncClient().get(
        "/v1/models", headers={"x-api-key": "llmr_wrong", "anthropic-version": "2023-06-01"}
    )
    assert response.status_code == 401
    assert response.json()["type"] == "error"
    assert response.json()["error"]["code"] == "invalid_api_key"
