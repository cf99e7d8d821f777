"""Anthropic Messages answers for the MockTransport upstream, shaped like the real API's."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx

from tests.proxy.conftest import streaming

MODEL = "claude-3-5-haiku-latest"
# Reported by every default answer: 100 plain input tokens, 1000 read from the cache, 200
# written to it, 50 generated.
USAGE = {
    "input_tokens": 100,
    "cache_read_input_tokens": 1000,
    "cache_creation_input_tokens": 200,
    "output_tokens": 50,
}


def message(text: str = "Hello there!", usage: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": MODEL,
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": usage or USAGE,
    }


def event(data: dict[str, Any]) -> bytes:
    return f"event: {data['type']}\ndata: {json.dumps(data)}\n\n".encode()


def text_delta(text: str) -> bytes:
    return event(
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}
    )


def message_start(usage: dict[str, Any] | None = None) -> bytes:
    start = {k: v for k, v in (usage or USAGE).items() if k != "output_tokens"}
    body = {**message(usage={**start, "output_tokens": 1}), "content": [], "stop_reason": None}
    return event({"type": "message_start", "message": body})


BLOCK_START = event(
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
)
PING = event({"type": "ping"})
BLOCK_STOP = event({"type": "content_block_stop", "index": 0})
MESSAGE_STOP = event({"type": "message_stop"})


def message_delta(output_tokens: int = USAGE["output_tokens"]) -> bytes:
    return event(
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": {"output_tokens": output_tokens},
        }
    )


def events(words: list[str]) -> list[bytes]:
    """A whole stream, as Anthropic sends it."""
    return [
        message_start(),
        BLOCK_START,
        PING,
        *[text_delta(w) for w in words],
        BLOCK_STOP,
        message_delta(),
        MESSAGE_STOP,
    ]


def message_ok(request: httpx.Request) -> httpx.Response:
    body = json.loads(request.content)
    if body.get("stream"):
        return streaming(*events(["Hel", "lo", "!"]))(request)
    return httpx.Response(
        200,
        json=message(),
        headers={
            "anthropic-ratelimit-requests-limit": "1000",
            "anthropic-ratelimit-requests-remaining": "999",
        },
    )


def error(
    status: int, etype: str, text: str = "", *, headers: dict[str, str] | None = None
) -> Callable[[httpx.Request], httpx.Response]:
    def reply(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            status,
            headers=headers or {},
            json={"type": "error", "error": {"type": etype, "message": text or etype}},
        )

    return reply
