"""A gateway configured through the public config format, with a scripted MockTransport upstream."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

SECRETS = {
    "k1": "sk-test-key-one-aaaaaaaaaaaa1111",
    "k2": "sk-test-key-two-bbbbbbbbbbbb2222",
    "f1": "sk-test-fallback-cccccccccc3333",
    "a1": "sk-ant-test-one-dddddddddddd4444",
    "a2": "sk-ant-test-two-eeeeeeeeeeee5555",
}
KEY_IDS = {
    SECRETS["k1"]: "openai-1",
    SECRETS["k2"]: "openai-2",
    SECRETS["f1"]: "backup-1",
    SECRETS["a1"]: "claude-1",
    SECRETS["a2"]: "claude-2",
}
# A reply may be async (MockTransport awaits it), to keep the proxy waiting.
Reply = Callable[[httpx.Request], httpx.Response | Awaitable[httpx.Response]]


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

    queues: dict[str, list[Reply]] = field(default_factory=dict)
    requests: list[httpx.Request] = field(default_factory=list)
    # Consumed before any per-key reply, whichever key the proxy picks.
    next_replies: list[Reply] = field(default_factory=list)
    # The answer when nothing is queued (None: the OpenAI success `ok`).
    default: Reply | None = None

    def first(self, reply: Reply) -> None:
        self.next_replies.append(reply)

    def then(self, key: str, reply: Reply) -> None:
        self.queues.setdefault(SECRETS.get(key, key), []).append(reply)

    def secrets_used(self) -> list[str]:
        return [_secret(r) for r in self.requests]

    def keys_used(self) -> list[str]:
        return [KEY_IDS[secret] for secret in self.secrets_used()]

    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(r.content) for r in self.requests]

    def __call__(self, request: httpx.Request) -> httpx.Response | Awaitable[httpx.Response]:
        self.requests.append(request)
        secret = _secret(request)
        if self.next_replies:
            return self.next_replies.pop(0)(request)
        queue = self.queues.get(secret)
        if queue:
            return queue.pop(0)(request)
        return (self.default or ok)(request)


def _secret(request: httpx.Request) -> str:
    """The upstream key a request carries: bearer (OpenAI format) or x-api-key (Anthropic)."""
    bearer = request.headers.get("authorization", "").removeprefix("Bearer ")
    return bearer or request.headers.get("x-api-key", "")


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


def chunk_event(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
    """One `chat.completion.chunk` SSE event."""
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        **extra,
    }
    return b"data: " + json.dumps(body).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"


async def _paced(script: tuple[bytes | float | Exception, ...]) -> AsyncIterator[bytes]:
    for step in script:
        if isinstance(step, bytes):
            yield step
        elif isinstance(step, Exception):
            raise step
        else:
            await asyncio.sleep(step)


def streaming(*script: bytes | float | Exception) -> Reply:
    """A 200 event stream played step by step: bytes are sent as one chunk, a number pauses
    that many seconds, an exception breaks the connection there."""

    def reply(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, headers={"content-type": "text/event-stream"}, content=_paced(script)
        )

    return reply


def slow(seconds: float) -> Reply:
    """Answers (successfully) only after `seconds`."""

    async def reply(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(seconds)
        return ok(request)

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


def gateway_serving(
    config: dict[str, Any], mock_upstream: Callable[..., None]
) -> Iterator[Gateway]:
    """The body of a gateway fixture: `config` imported, the fake upstream in place."""
    from keys.config_io import config_import
    from usage.recorder import get_recorder

    report = config_import(data=config)
    upstream = Upstream()
    mock_upstream(upstream)
    yield Gateway(token=report.generated_tokens["app"], upstream=upstream, config=config)
    # Write this test's records now, while its database still exists.
    get_recorder().flush(timeout=10)


@pytest.fixture
def gateway(transactional_db: None, mock_upstream: Callable[..., None]) -> Iterator[Gateway]:
    yield from gateway_serving(base_config(), mock_upstream)


def anthropic_config() -> dict[str, Any]:
    """Two Anthropic keys, and routes that mix in an OpenAI-format provider."""
    claude = {"provider": "anthropic", "model": "claude-3-5-haiku-latest"}
    return {
        "providers": {
            "anthropic": {
                "kind": "anthropic",
                "base_url": "https://anthropic.test/v1",
                "cooldown_seconds": 30,
                "quarantine_seconds": 300,
            },
            "openai": {"kind": "openai", "base_url": "https://upstream.test/v1"},
        },
        "keys": [
            {"id": "claude-1", "provider": "anthropic", "secret": f"literal://{SECRETS['a1']}"},
            # Second in priority, so that a fault scripted on claude-1 is always met first.
            {
                "id": "claude-2",
                "provider": "anthropic",
                "secret": f"literal://{SECRETS['a2']}",
                "priority": 1,
            },
            {"id": "openai-1", "provider": "openai", "secret": f"literal://{SECRETS['k1']}"},
        ],
        "routes": {
            "claude": {"strategy": "health_aware", "deployments": [claude]},
            "gpt-first": {"deployments": [{"provider": "openai", "model": "gpt-4o-mini"}, claude]},
            "gpt-only": {"deployments": [{"provider": "openai", "model": "gpt-4o-mini"}]},
        },
        "clients": [
            {"name": "app", "routes": ["*"], "scopes": ["proxy"]},
            {"name": "monitor", "routes": ["*"], "scopes": ["monitor"]},
        ],
    }


@dataclass
class AnthropicGateway(Gateway):
    monitor_token: str = ""

    def headers(self, token: str | None = None) -> dict[str, str]:
        # What the anthropic SDK sends.
        return {"x-api-key": token or self.token, "anthropic-version": "2023-06-01"}


@pytest.fixture
def anthropic_gateway(
    transactional_db: None, mock_upstream: Callable[..., None]
) -> Iterator[AnthropicGateway]:
    from keys.config_io import config_import
    from tests.proxy.anthropic_wire import message_ok
    from usage.recorder import get_recorder

    config = anthropic_config()
    report = config_import(data=config)
    upstream = Upstream(default=message_ok)
    mock_upstream(upstream)
    yield AnthropicGateway(
        token=report.generated_tokens["app"],
        upstream=upstream,
        config=config,
        monitor_token=report.generated_tokens["monitor"],
    )
    get_recorder().flush(timeout=10)


async def eventually(condition: Callable[[], Any], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


@dataclass
class AsgiResult:
    """What `llmrotate_site.asgi.application` sent: the status (None when nothing was sent),
    the headers by lowercase name, the body, and every message type in order."""

    status: int | None
    headers: dict[bytes, bytes]
    body: bytes
    sent: list[str]


def asgi_scope(
    path: str, *, method: str = "POST", headers: tuple[tuple[bytes, bytes], ...] = ()
) -> dict[str, Any]:
    """The HTTP scope uvicorn would pass for a JSON request from 127.0.0.1 (host first)."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"testserver"), (b"content-type", b"application/json"), *headers],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }


async def asgi_request(
    path: str,
    *,
    body: bytes = b"",
    method: str = "POST",
    headers: tuple[tuple[bytes, bytes], ...] = (),
    host: bytes = b"testserver",
    hang_up: asyncio.Event | None = None,
    hang_up_after_first_body: bool = False,
) -> AsgiResult:
    """One request through the real ASGI app, the way uvicorn calls it (no Django test client,
    so the `/v1/` fast path is what answers). The client disconnects once `hang_up` is set,
    or right after the first body message when `hang_up_after_first_body`."""
    from llmrotate_site.asgi import application

    gone = hang_up or asyncio.Event()
    scope = asgi_scope(
        path, method=method, headers=((b"content-length", str(len(body)).encode()), *headers)
    )
    scope["headers"][0] = (b"host", host)
    messages: list[dict[str, Any]] = []
    received = False

    async def receive() -> dict[str, Any]:
        nonlocal received
        if not received:
            received = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)
        if hang_up_after_first_body and message["type"] == "http.response.body":
            gone.set()
            await asyncio.sleep(30)  # a client that is gone reads nothing more

    await asyncio.wait_for(application(scope, receive, send), timeout=10)
    start = next((m for m in messages if m["type"] == "http.response.start"), None)
    return AsgiResult(
        status=start["status"] if start else None,
        headers={name.lower(): value for name, value in start["headers"]} if start else {},
        body=b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body"),
        sent=[m["type"] for m in messages],
    )


async def post_stream_timed(
    path: str, body: dict[str, Any], headers: dict[str, str]
) -> tuple[Any, list[bytes], float]:
    """POST a streaming request: the response, every chunk the client got, and the ms from
    sending it to the first chunk."""
    from django.test import AsyncClient

    t0 = time.perf_counter()
    response = await AsyncClient().post(
        path, data=json.dumps(body), content_type="application/json", headers=headers
    )
    chunks: list[bytes] = []
    first_ms = 0.0
    async for chunk in response.streaming_content:
        if not chunks:
            first_ms = (time.perf_counter() - t0) * 1000
        chunks.append(chunk)
    return response, chunks, first_ms
