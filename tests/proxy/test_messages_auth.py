"""Client tokens on the Anthropic endpoint: `x-api-key` (the anthropic SDK) or a bearer token,
the same 401/403 rules as everywhere, in Anthropic's error envelope."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.test import AsyncClient

from keys.services import client_token_revoke
from tests.proxy.conftest import AnthropicGateway

pytestmark = pytest.mark.asyncio

BODY = {"model": "claude", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}


async def post(headers: dict[str, str]) -> Any:
    return await AsyncClient().post(
        "/v1/messages", data=json.dumps(BODY), content_type="application/json", headers=headers
    )


def assert_anthropic_error(response: Any, status: int, code: str) -> None:
    assert response.status_code == status
    body = response.json()
    assert body["type"] == "error", "the anthropic SDK expects its envelope"
    assert body["error"]["code"] == code
    assert body["error"]["type"] in ("authentication_error", "permission_error")


async def test_a_token_in_x_api_key_is_accepted(anthropic_gateway: AnthropicGateway):
    response = await post({"x-api-key": anthropic_gateway.token})
    assert response.status_code == 200


async def test_a_bearer_token_is_accepted(anthropic_gateway: AnthropicGateway):
    response = await post({"Authorization": f"Bearer {anthropic_gateway.token}"})
    assert response.status_code == 200


async def test_a_wrong_x_api_key_is_a_401(anthropic_gateway: AnthropicGateway):
    response = await post({"x-api-key": "llmr_wrong_token_0000000000000000"})
    assert_anthropic_error(response, 401, "invalid_api_key")
    assert anthropic_gateway.upstream.requests == []


async def test_a_wrong_bearer_token_is_a_401_in_anthropics_envelope(anthropic_gateway):
    response = await post({"Authorization": "Bearer llmr_wrong_token_0000000000000000"})
    assert_anthropic_error(response, 401, "invalid_api_key")


async def test_no_token_is_a_401_that_names_both_headers(anthropic_gateway: AnthropicGateway):
    response = await post({"anthropic-version": "2023-06-01"})
    assert_anthropic_error(response, 401, "missing_api_key")
    assert "x-api-key" in response.json()["error"]["message"]
    assert anthropic_gateway.upstream.requests == []


async def test_a_revoked_token_is_a_401(anthropic_gateway: AnthropicGateway):
    from asgiref.sync import sync_to_async

    from keys.models import ClientToken

    token = await ClientToken.objects.aget(name="app")
    await sync_to_async(client_token_revoke)(token=token)
    response = await post({"x-api-key": anthropic_gateway.token})
    assert_anthropic_error(response, 401, "token_revoked")


async def test_a_token_without_the_proxy_scope_is_a_403(anthropic_gateway: AnthropicGateway):
    response = await post({"x-api-key": anthropic_gateway.monitor_token})
    assert_anthropic_error(response, 403, "missing_scope")
    assert anthropic_gateway.upstream.requests == []
