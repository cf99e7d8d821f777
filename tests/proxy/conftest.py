"""A gateway configured through the public config format, with a scripted MockTransport upstream."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

SECRETS = {
    "k1": "sk-test-key-one-aaaaaaaaaaaa1111",
    "k2": "sk-test-key-two-bbbbbbbbbbbb2222",
    "f1": "sk-test-fallback-cccccccccc3333",
}


def completion(model: str = "gpt-4o-mini", text: str = "Hello there!") -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        ],
        "usage": {
            "prompt_tokens": 12,
            "completion_tokens": 3,
            "total_tokens": 15,
            "prompt_tokens_details": {"cached_tokens": 2},
            "completion_tokens_details": {"reasoning_tokens": 0},
        },
    }


def sse_chunks(words: list[str], *, usage: bool, cut_after: int | None = None) -> list[bytes]:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        body: dict[str, Any] = {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "gpt-4o-mini",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        if usage:
            body["usage"] = None
        return b"data: " + json.dumps(body).encode() + b"\n\n"

    events = [chunk({"role": "assistant", "content": ""})]
    events += [chunk({"content": w}) for w in words]
    events.append(chunk({}, "stop"))
    if usage:
        events.append(
            b"data: "
            + json.dumps(
                {
                    "id": "chatcmpl-1",
                    "object": "chat.completion.chunk",
                    "created": 1,
                    "model": "gpt-4o-mini",
                    "choices": [],
                    "usage": {
                        "prompt_tokens": 9,
                        "completion_tokens": len(words),
                        "total_tokens": 9 + len(words),
                    },
                }
            ).encode()
            + b"\n\n"
        )
    events.append(b"data: [DONE]\n\n")
    if cut_after is not None:
        return events[:cut_after]
    return events


class _Cut(httpx.ReadError):
    pass


async def _body(events: list[bytes], cut: bool) -> AsyncIterator[bytes]:
    for event in events:
        yield event
    if cut:
        raise _Cut("connection reset mid-stream")


@dataclass
class Upstream:
    """Answers per key secret: a queue of one-shot replies, then the default success."""

    queues: dict[str, list[Callable[[httpx.Request], httpx.Response]]] = field(default_factory=dict)
    requests: list[httpx.Request] = field(default_factory=list)
    # Consumed before any per-key reply, whichever key the proxy picks.
    next_replies: list[Callable[[httpx.Request], httpx.Response]] = field(default_factory=list)

    def first(self, reply: Callable[[httpx.Request], httpx.Response]) -> None:
        self.next_replies.append(reply)

    def then(self, key: str, reply: Callable[[httpx.Request], httpx.Response]) -> None:
        self.queues.setdefault(SECRETS.get(key, key), []).append(reply)

    def secrets_used(self) -> list[str]:
        return [r.headers["authorization"].removeprefix("Bearer ") for r in self.requests]

    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(r.content) for r in self.requests]

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        secret = request.headers.get("authorization", "").removeprefix("Bearer ")
        if self.next_replies:
            return self.next_replies.pop(0)(request)
        queue = self.queues.get(secret)
        if queue:
            return queue.pop(0)(request)
        return ok(request)


def ok(request: httpx.Request) -> httpx.Response:
    body = json.loads(request.content)
    if body.get("stream"):
        include = bool((body.get("stream_options") or {}).get("include_usage"))
        return httpx.Response(
            200,
            headers={"content-type": "text/event-stream"},
            content=_body(sse_chunks(["Hel", "lo", "!"], usage=include), cut=False),
        )
    return httpx.Response(
        200, json=completion(body["model"]), headers={"x-ratelimit-remaining-requests": "99"}
    )


def status(
    code: int, *, error_code: str = "x", headers: dict[str, str] | None = None
) -> Callable[[httpx.Request], httpx.Response]:
    def reply(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            code,
            headers=headers or {},
            json={"error": {"message": f"upstream says {code}", "type": "t", "code": error_code}},
        )

    return reply


def raises(exc: Exception) -> Callable[[httpx.Request], httpx.Response]:
    def reply(request: httpx.Request) -> httpx.Response:
        raise exc

    return reply


def stream_cut(after: int) -> Callable[[httpx.Request], httpx.Response]:
    def reply(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200,
            headers={"content-type": "text/event-stream"},
            content=_body(sse_chunks(["a", "b", "c", "d"], usage=True, cut_after=after), cut=True),
        )

    return reply


@dataclass
class Gateway:
    token: str
    upstream: Upstream
    config: dict[str, Any]

    def headers(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.token}"}


def base_config(strategy: str = "health_aware") -> dict[str, Any]:
    return {
        "providers": {
            "openai": {
                "kind": "openai",
                "base_url": "https://upstream.test/v1",
                "cooldown_seconds": 30,
                "quarantine_seconds": 300,
            },
            "backup": {"kind": "openai_compatible", "base_url": "https://backup.test/v1"},
        },
        "keys": [
            {"id": "openai-1", "provider": "openai", "secret": f"literal://{SECRETS['k1']}"},
            {"id": "openai-2", "provider": "openai", "secret": f"literal://{SECRETS['k2']}"},
            {"id": "backup-1", "provider": "backup", "secret": f"literal://{SECRETS['f1']}"},
        ],
        "routes": {
            "gpt-4o-mini": {
                "strategy": strategy,
                "deployments": [{"provider": "openai", "model": "gpt-4o-mini"}],
            },
            "with-fallback": {
                "deployments": [
                    {"provider": "openai", "model": "gpt-4o-mini"},
                    {"provider": "backup", "model": "llama-3"},
                ]
            },
            "secret-route": {"deployments": [{"provider": "openai", "model": "gpt-4o"}]},
        },
        "clients": [
            {"name": "app", "routes": ["gpt-4o-mini", "with-fallback"], "scopes": ["proxy"]},
        ],
    }


@pytest.fixture
def gateway(transactional_db: None, mock_upstream: Callable[..., None]) -> Iterator[Gateway]:
    from keys.config_io import config_import
    from usage.recorder import get_recorder

    config = base_config()
    report = config_import(data=config)
    upstream = Upstream()
    mock_upstream(upstream)
    yield Gateway(token=report.generated_tokens["app"], upstream=upstream, config=config)
    # Write this test's records now, while its database still exists.
    get_recorder().flush(timeout=10)
