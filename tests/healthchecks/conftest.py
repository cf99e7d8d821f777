"""Health-check fixtures: the proxy gateway of tests/proxy, a loopback webhook receiver, the
health changes announced, and helpers to set breaker state directly in the shared store."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from healthchecks import breaker
from healthchecks.breaker import BreakerState
from healthchecks.breaker_store import get_breaker_store
from healthchecks.breakers import breaker_policy
from tests.e2e.conftest import serve_processes  # noqa: F401 - fixtures these tests use too
from tests.proxy.conftest import gateway  # noqa: F401

PRIMARY = "https://upstream.test/v1"  # tests/proxy/conftest.py: provider "openai"
BACKUP = "https://backup.test/v1"  # provider "backup", the second step of "with-fallback"


def open_breaker(endpoint: str, *, open_until: float | None = None) -> BreakerState:
    """Trip `endpoint` in the shared store; `open_until` in the past makes it half-open."""
    now = time.time()

    def fn(state: BreakerState) -> tuple[BreakerState, None]:
        tripped = breaker.trip(state, now=now, policy=breaker_policy(), reason="test")
        if open_until is not None:
            tripped = dataclasses.replace(tripped, open_until=open_until)
        return tripped, None

    return get_breaker_store().update(endpoint, fn)[1]


@pytest.fixture
def changes() -> Iterator[list[dict[str, Any]]]:
    """Every health change announced (the endpoint_health_changed signal), in order."""
    from healthchecks.signals import endpoint_health_changed

    seen: list[dict[str, Any]] = []

    def receiver(sender: Any, payload: dict[str, Any], **kwargs: Any) -> None:
        seen.append(payload)

    endpoint_health_changed.connect(receiver)
    yield seen
    endpoint_health_changed.disconnect(receiver)


def stored(endpoint: str) -> BreakerState:
    return get_breaker_store().get(endpoint)


def wait_until(predicate: Callable[[], Any], *, timeout: float = 10, message: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(message or "condition not met in time")
        time.sleep(0.05)


@dataclass
class Delivery:
    body: bytes
    headers: dict[str, str]

    def json(self) -> dict[str, Any]:
        return json.loads(self.body)


@dataclass
class WebhookReceiver:
    """A tiny HTTP server on 127.0.0.1 that records every POST; `fail_next` answers 500s."""

    deliveries: list[Delivery] = field(default_factory=list)
    fail_next: int = 0
    attempts: int = 0
    url: str = ""

    def events(self) -> list[str]:
        return [d.json()["event"] for d in self.deliveries]


@pytest.fixture
def webhook_receiver() -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver()
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            with lock:
                receiver.attempts += 1
                failing = receiver.fail_next > 0
                if failing:
                    receiver.fail_next -= 1
                else:
                    receiver.deliveries.append(Delivery(body, dict(self.headers.items())))
            self.send_response(500 if failing else 204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
