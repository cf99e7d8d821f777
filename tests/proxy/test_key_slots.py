"""No request, however malformed, leaks a key's in-flight slot or wedges a probing key.

Bodies and headers the gateway could not send upstream are refused (400, in the caller's
dialect) before any key is taken; and whatever raises once a key is taken, the key is given
back and the attempt recorded, because the attempt is one `async with` block.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest
from asgiref.sync import sync_to_async
from django.test import AsyncClient

from keys.health import CallResult, KeyPolicy, KeyState, KeyStatus, Outcome
from keys.models import ApiKey
from keys.services import api_key_health_action
from keys.state_store import get_key_state_store
from proxy.dialects import OpenAIDialect
from tests.proxy.conftest import AnthropicGateway, Gateway
from usage.models import CallRecord

pytestmark = pytest.mark.asyncio
KEYS = ["openai-1", "openai-2"]


def in_flight(key_ids: list[str] = KEYS) -> dict[str, int]:
    states = get_key_state_store().get_many(key_ids, now=time.time())
    return {key_id: count for key_id, (_, count) in states.items()}


async def only_a_probing_key() -> None:
    """openai-1 half-open (one trial call), openai-2 disabled: every call is openai-1's trial."""
    store, now, policy = get_key_state_store(), time.time(), KeyPolicy()
    await store.record("openai-1", CallResult(Outcome.AUTH_FAILED, now=now, policy=policy))
    assert store.recheck("openai-1", ok=True, now=now, policy=policy).status == KeyStatus.PROBING
    store.manual("openai-2", "disable", now=now)


def state(key_id: str = "openai-1") -> KeyState:
    return get_key_state_store().get_many([key_id], now=time.time())[key_id][0]


async def post_raw(gateway: Gateway, raw: bytes):
    return await AsyncClient().post(
        "/v1/chat/completions", data=raw, content_type="application/json", headers=gateway.headers()
    )


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


LONE_SURROGATE = (
    b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "cut \\ud83d here"}]}'
)


async def one_refusal(flush: Callable[[], None]) -> CallRecord:
    """The one record of a request refused before any attempt: attempt 0, no key (the
    refusals table of docs/errors.md)."""
    [record] = await records(flush)
    assert (record.attempt, record.key_id, record.outcome) == (0, "", "refused")
    assert record.client_status == 400
    return record


async def records(flush: Callable[[], None]) -> list[CallRecord]:
    await sync_to_async(flush)()
    return [r async for r in CallRecord.objects.order_by("id")]


async def test_a_lone_surrogate_is_a_400_before_any_key_is_taken(gateway: Gateway, flush_records):
    await only_a_probing_key()
    response = await post_raw(gateway, LONE_SURROGATE)
    assert response.status_code == 400, response.content
    assert response.json()["error"]["code"] == "invalid_unicode"
    assert gateway.upstream.requests == []
    assert in_flight() == {"openai-1": 0, "openai-2": 0}
    # Refused before any attempt: one record of the refusal, with no key (docs/errors.md).
    assert (await one_refusal(flush_records)).error_type == "invalid_unicode"
    # The probing key's one trial is still free: the next good call is served by it.
    good = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    assert (await post_raw(gateway, json.dumps(good).encode())).status_code == 200
    assert state().status == KeyStatus.ACTIVE


@pytest.mark.parametrize("depth", [101, 970, 5000])
async def test_json_nested_too_deep_is_a_400_that_names_the_limit(
    gateway: Gateway, flush_records, depth
):
    raw = (
        '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}],'
        f' "metadata": {nested(depth)}}}'
    ).encode()
    response = await post_raw(gateway, raw)
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["code"] == "too_deep"
    assert "100 levels" in error["message"]
    assert gateway.upstream.requests == []
    assert in_flight() == {"openai-1": 0, "openai-2": 0}
    await one_refusal(flush_records)


async def test_json_nested_up_to_the_limit_is_sent(gateway: Gateway):
    raw = (
        '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}],'
        f' "metadata": {nested(99)}}}'
    ).encode()
    response = await post_raw(gateway, raw)
    assert response.status_code == 200, response.content
    assert len(gateway.upstream.requests) == 1


@pytest.mark.parametrize("header", ["anthropic-beta", "anthropic-version"])
async def test_a_non_ascii_forwarded_header_is_a_400_naming_it(
    anthropic_gateway: AnthropicGateway, flush_records, header
):
    body = {"model": "claude", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    headers = {**anthropic_gateway.headers(), header: "tools-2024-04-04,café"}
    response = await AsyncClient().post(
        "/v1/messages", data=json.dumps(body), content_type="application/json", headers=headers
    )
    assert response.status_code == 400, response.content
    payload = response.json()
    assert payload["type"] == "error"  # Anthropic's envelope
    assert payload["error"]["param"] == header
    assert header in payload["error"]["message"]
    assert anthropic_gateway.upstream.requests == []
    assert in_flight(["claude-1", "claude-2"]) == {"claude-1": 0, "claude-2": 0}
    await one_refusal(flush_records)


async def test_whatever_raises_after_a_key_is_taken_gives_it_back_and_is_recorded(
    gateway: Gateway, flush_records, monkeypatch
):
    await only_a_probing_key()

    def broken(self, *args, **kwargs):
        raise RuntimeError("a bug in the gateway")

    monkeypatch.setattr(OpenAIDialect, "headers", broken)
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    response = await post_raw(gateway, json.dumps(body).encode())
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "internal_error"
    assert in_flight() == {"openai-1": 0, "openai-2": 0}
    [record] = await records(flush_records)
    assert (record.key_id, record.outcome) == ("openai-1", "gateway_error")
    # Not held against the key, and its one trial is free again.
    assert state().status == KeyStatus.PROBING
    monkeypatch.undo()
    assert (await post_raw(gateway, json.dumps(body).encode())).status_code == 200


async def test_a_reset_forgets_calls_counted_in_flight(gateway: Gateway):
    store = get_key_state_store()
    now = time.time()
    # Calls that were taken and never given back (a crash, or a bug of the past).
    assert await store.acquire("openai-1", now=now)
    assert await store.acquire("openai-1", now=now)
    assert in_flight(["openai-1"]) == {"openai-1": 2}
    api_key = await ApiKey.objects.aget(key_id="openai-1")
    await sync_to_async(api_key_health_action)(api_key=api_key, action="reset")
    assert in_flight(["openai-1"]) == {"openai-1": 0}
