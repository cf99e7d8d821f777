"""The web worker tunes Python's garbage collector once it has started (llmrotate_site/asgi.py
_collector_tune says why)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from llmrotate_site import asgi


@pytest.fixture
def gc_calls(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """What the worker asks of the collector, without changing this test process's."""
    calls: list[Any] = []
    monkeypatch.setattr(asgi.gc, "freeze", lambda: calls.append("freeze"))
    monkeypatch.setattr(asgi.gc, "get_threshold", lambda: (700, 10, 10))
    monkeypatch.setattr(asgi.gc, "set_threshold", lambda *limits: calls.append(limits))
    return calls


def test_the_start_up_heap_is_frozen_and_young_collections_are_fewer(gc_calls: list[Any]):
    asgi._collector_tune()
    assert gc_calls == ["freeze", (asgi.GC_YOUNG_THRESHOLD, 10, 10)]
    assert asgi.GC_YOUNG_THRESHOLD > 700  # fewer collections than Python's default


@pytest.mark.django_db(transaction=True)
def test_the_worker_tunes_the_collector_when_it_has_started(gc_calls: list[Any]):
    messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    sent: list[str] = []

    async def receive() -> dict[str, str]:
        return next(messages)

    async def send(message: dict[str, str]) -> None:
        sent.append(message["type"])
        if message["type"] == "lifespan.startup.complete":
            # Tuned by the time the server is told it may serve, not later.
            assert gc_calls[:1] == ["freeze"]

    asyncio.run(asgi.application({"type": "lifespan"}, receive, send))
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert gc_calls == ["freeze", (asgi.GC_YOUNG_THRESHOLD, 10, 10)]
