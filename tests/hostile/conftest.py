"""Hostile callers, in process: requests sent through `llmrotate_site.asgi.application` itself
(the body-size limit, the early token check, the `/v1/` fast path and the full stack behind
it), with an upstream that always answers, so that whatever a test sees comes from the
gateway's handling of the request and not from a scripted fault."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote, unquote

import httpx
import pytest

# At collection, not in the first test's time budget: it loads the whole site.
from llmrotate_site.asgi import application
from tests.proxy.anthropic_wire import message_ok
from tests.proxy.conftest import (  # noqa: F401  (fixtures used by this package's tests)
    AnthropicGateway,
    Gateway,
    anthropic_gateway,
    completion,
    gateway,
    ok,
)

# One request may take this long at most; a hang fails the test instead of blocking the run.
REQUEST_SECONDS = 10.0


def upstream_reply(request: httpx.Request) -> httpx.Response:
    """A success in the wire format the gateway spoke, whatever body it forwarded (a fuzzed
    request that reaches the upstream must not fail because the fake could not read it)."""
    try:
        body = json.loads(request.content)
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    if request.url.path.endswith("/messages"):
        return message_ok(
            httpx.Request("POST", request.url, json={"stream": bool(body.get("stream"))})
        )
    if body.get("stream") is True:
        return ok(httpx.Request("POST", request.url, json={"model": "gpt-4o-mini", "stream": True}))
    return httpx.Response(200, json=completion("gpt-4o-mini"))


@pytest.fixture
def lenient_upstream(mock_upstream: Callable[..., None]) -> None:
    mock_upstream(upstream_reply)


class Caller:
    """Requests to the ASGI application in this process, from a given address, the way uvicorn
    hands them over: a scope with the raw path, query string and headers (nothing on the way
    checks or normalizes them, as an HTTP client library would), the body in one message.
    On an event loop of its own that lives as long as the test (Hypothesis calls the test body
    once per example, synchronously)."""

    def __init__(self, address: str = "127.0.0.1") -> None:
        self.address = address
        self.runner = asyncio.Runner()

    def request(
        self,
        method: str,
        target: str,
        *,
        content: bytes = b"",
        headers: dict[str, str] | list[tuple[bytes, bytes]] | None = None,
        address: str | None = None,
    ) -> httpx.Response:
        """`target` is the path and query as they would appear on the request line; characters
        outside ASCII are sent percent-encoded as UTF-8 (lone surrogates too)."""
        if isinstance(headers, dict):
            headers = [(k.lower().encode(), v.encode("latin-1")) for k, v in headers.items()]
        raw_headers = [(b"host", b"testserver"), *(headers or [])]
        if not any(name == b"content-length" for name, _ in raw_headers):
            raw_headers.append((b"content-length", str(len(content)).encode()))
        raw_target = quote(target, safe="/?&=%:+,;@!$'()*[]~", errors="surrogatepass")
        raw_path, _, query = raw_target.partition("?")
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": unquote(raw_path),
            "raw_path": raw_path.encode("ascii"),
            "query_string": query.encode("ascii"),
            "root_path": "",
            "headers": raw_headers,
            "client": (address or self.address, 50000),
            "server": ("testserver", 80),
        }
        return self.runner.run(asyncio.wait_for(self._send(scope, content), REQUEST_SECONDS))

    async def _send(self, scope: dict[str, Any], body: bytes) -> httpx.Response:
        done = asyncio.Event()
        received = False
        messages: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            nonlocal received
            if not received:
                received = True
                return {"type": "http.request", "body": body, "more_body": False}
            await done.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            messages.append(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                done.set()

        try:
            await application(scope, receive, send)
        finally:
            done.set()
        start = next(m for m in messages if m["type"] == "http.response.start")
        return httpx.Response(
            start["status"],
            headers=[(k, v) for k, v in start.get("headers", ())],
            content=b"".join(
                m.get("body", b"") for m in messages if m["type"] != "http.response.start"
            ),
        )

    def close(self) -> None:
        self.runner.close()


@pytest.fixture
def caller() -> Iterator[Caller]:
    client = Caller()
    try:
        yield client
    finally:
        client.close()


def openai_error(response: httpx.Response) -> dict[str, Any]:
    """The error of an OpenAI-envelope body, `{"error": {message, type, code, param}}`, with
    nothing else at the top."""
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert {"message", "type", "code", "param"} <= set(error), body
    assert isinstance(error["message"], str) and isinstance(error["code"], str), body
    return error


def anthropic_error(response: httpx.Response) -> dict[str, Any]:
    """The error of an Anthropic-envelope body, `{"type": "error", "error": {…}}`."""
    body = response.json()
    assert body.get("type") == "error" and set(body) == {"type", "error"}, body
    error = body["error"]
    assert {"message", "type"} <= set(error) and isinstance(error["message"], str), body
    return error
