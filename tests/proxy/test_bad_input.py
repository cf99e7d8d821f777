"""Every kind of bad request gets a documented status and an OpenAI-shaped error body."""

from __future__ import annotations

import json
import logging

import pytest
from django.test import AsyncClient, override_settings

from tests.proxy.conftest import SECRETS, Gateway

pytestmark = pytest.mark.asyncio
GOOD = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


async def call(gateway: Gateway, body: bytes | dict, token: str | None = "default"):
    headers = {} if token is None else gateway.headers(None if token == "default" else token)
    data = body if isinstance(body, bytes) else json.dumps(body)
    return await AsyncClient().post(
        "/v1/chat/completions", data=data, content_type="application/json", headers=headers
    )


def assert_error(response, status: int, code: str) -> None:
    assert response.status_code == status, response.content
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code"}
    assert error["code"] == code


async def test_invalid_json_is_400(gateway: Gateway):
    assert_error(await call(gateway, b"{not json"), 400, "invalid_json")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": "gpt-4o-mini"}, "messages"),
        ({"model": 42, "messages": [{"role": "user"}]}, "model"),
        ({"model": "gpt-4o-mini", "messages": "hi"}, "messages"),
        ({"model": "gpt-4o-mini", "messages": []}, "messages"),
        ({"model": "gpt-4o-mini", "messages": ["hi"]}, "messages[0]"),
        ({**GOOD, "stream": "yes"}, "stream"),
        ({**GOOD, "stream_options": "usage"}, "stream_options"),
    ],
)
async def test_missing_or_mistyped_fields_are_400(gateway: Gateway, body, param):
    response = await call(gateway, body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param


async def test_a_json_array_body_is_400(gateway: Gateway):
    assert (await call(gateway, b"[1,2]")).status_code == 400


async def test_an_unknown_model_is_404(gateway: Gateway):
    assert_error(await call(gateway, {**GOOD, "model": "gpt-9"}), 404, "model_not_found")


async def test_a_route_the_token_may_not_use_is_403(gateway: Gateway):
    assert_error(await call(gateway, {**GOOD, "model": "secret-route"}), 403, "route_not_allowed")


async def test_a_missing_token_is_401(gateway: Gateway):
    assert_error(await call(gateway, GOOD, token=None), 401, "missing_api_key")


async def test_a_wrong_token_is_401(gateway: Gateway):
    forged = gateway.token[:-4] + "abcd"
    assert_error(await call(gateway, GOOD, token=forged), 401, "invalid_api_key")
    assert_error(await call(gateway, GOOD, token="garbage"), 401, "invalid_api_key")


async def test_a_revoked_token_is_401(gateway: Gateway):
    from asgiref.sync import sync_to_async

    from keys.models import ClientToken
    from keys.services import client_token_revoke

    token = await ClientToken.objects.aget(name="app")
    await sync_to_async(client_token_revoke)(token=token)
    assert_error(await call(gateway, GOOD), 401, "token_revoked")


async def test_a_token_without_the_proxy_scope_is_403(gateway: Gateway):
    from asgiref.sync import sync_to_async

    from keys.services import client_token_create

    _, token = await sync_to_async(client_token_create)(
        name="mon", routes=["*"], scopes=["monitor"]
    )
    assert_error(await call(gateway, GOOD, token=token), 403, "missing_scope")


async def test_an_oversized_body_is_413(gateway: Gateway):
    with override_settings(LLMROTATE_MAX_REQUEST_BYTES=1000):
        big = {**GOOD, "messages": [{"role": "user", "content": "x" * 2000}]}
        assert_error(await call(gateway, big), 413, "request_too_large")
    assert gateway.upstream.requests == []


async def test_no_secret_appears_in_errors_or_logs(gateway: Gateway, caplog):
    from tests.proxy.conftest import status

    caplog.set_level(logging.DEBUG)
    gateway.upstream.then("k1", status(401))
    gateway.upstream.then("k2", status(500))
    bodies = [
        (await call(gateway, GOOD)).content,
        (await call(gateway, b"{bad")).content,
        (await call(gateway, GOOD, token=gateway.token + "x")).content,
        (await call(gateway, {**GOOD, "model": "nope"})).content,
    ]
    text = b"".join(bodies).decode() + caplog.text
    for secret in [*SECRETS.values(), gateway.token]:
        assert secret not in text
