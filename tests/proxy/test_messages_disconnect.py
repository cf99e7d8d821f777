"""An Anthropic client that hangs up mid-stream: through the real ASGI app, its key is given
back once and the attempt recorded as `client_disconnected`, not held against the key."""

from __future__ import annotations

import json
import time

import pytest

from keys.state_store import get_key_state_store
from tests.proxy.anthropic_wire import BLOCK_START, message_start, text_delta
from tests.proxy.conftest import AnthropicGateway, asgi_request, eventually, streaming
from usage.models import CallRecord

pytestmark = pytest.mark.asyncio

SLOW_STREAM = streaming(
    message_start(),
    BLOCK_START,
    text_delta("Hello there, this is the start of a long answer"),
    30.0,
    text_delta("never sent"),
)


def inflight(key_id: str) -> int:
    return get_key_state_store().get_many([key_id], now=time.time())[key_id][1]


async def test_a_client_that_hangs_up_mid_stream_gives_its_key_back(
    anthropic_gateway: AnthropicGateway, flush_records
):
    anthropic_gateway.upstream.first(SLOW_STREAM)
    body = json.dumps(
        {
            "model": "claude",
            "max_tokens": 64,
            "stream": True,
            "messages": [{"role": "user", "content": "hi"}],
        }
    ).encode()
    result = await asgi_request(
        "/v1/messages",
        body=body,
        headers=(
            (b"x-api-key", anthropic_gateway.token.encode()),
            (b"anthropic-version", b"2023-06-01"),
        ),
        hang_up_after_first_body=True,
    )
    sent = result.sent

    assert sent == ["http.response.start", "http.response.body"]
    [key_id] = anthropic_gateway.upstream.keys_used()
    await eventually(lambda: inflight(key_id) == 0)
    state = get_key_state_store().get_many([key_id], now=time.time())[key_id][0]
    assert state.total_failures == 0
    flush_records()
    [record] = [r async for r in CallRecord.objects.all()]
    assert (record.key_id, record.outcome, record.stream) == (key_id, "client_disconnected", True)
    assert record.prompt_tokens == 1300  # message_start's report is kept
