"""Fixtures for the recording layer: recorders with a private spool, a captured usage log."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from django.db import OperationalError

import usage.recorder as recorder_module
from usage.calls import CallData
from usage.models import Outcome
from usage.pricing import _genai_knows, price_overrides_invalidate
from usage.recorder import Recorder

T0 = datetime(2025, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)


def make_call(**overrides: Any) -> CallData:
    values: dict[str, Any] = {
        "request_id": "req-1",
        "started_at": T0,
        "finished_at": T0 + timedelta(milliseconds=420),
        "requested_model": "gpt-4o-mini",
        "outcome": Outcome.SUCCESS,
        "client": "client-a",
        "provider": "openai-main",
        "provider_kind": "openai",
        "upstream_model": "gpt-4o-mini",
        "key_id": "openai-1",
        "status_code": 200,
        "latency_ms": 420.0,
    }
    values.update(overrides)
    return CallData(**values)


def wait_until(predicate: Callable[[], bool], *, timeout: float = 15) -> None:
    """Poll until `predicate` holds. Reads may briefly collide with the flusher's writes on
    SQLite's shared in-memory test database, so a locked read is just another poll."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except OperationalError:
            pass
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


class FlakyWrites:
    """Stands in for `calls_write`: raises like an unreachable database `failures` times (or
    for as long as `down` is set), then writes for real."""

    def __init__(self, *, failures: int = 0, down: bool = False) -> None:
        self.real = recorder_module.calls_write
        self.failures = failures
        self.down = down
        self.calls = 0

    def __call__(self, records: list[Any]) -> None:
        self.calls += 1
        if self.down or self.calls <= self.failures:
            raise OperationalError('connection to server at "127.0.0.1" failed: refused')
        self.real(records)


@pytest.fixture(autouse=True)
def _fresh_price_caches() -> Iterator[None]:
    price_overrides_invalidate()
    _genai_knows.cache_clear()
    yield
    price_overrides_invalidate()


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    return tmp_path / "spool"


@pytest.fixture
def make_recorder(spool_dir: Path) -> Iterator[Callable[..., Recorder]]:
    """Recorders that only flush when asked (or when a batch fills), stopped after the test so
    their threads close their database connections before the test database goes away."""
    created: list[Recorder] = []

    def make(**kwargs: Any) -> Recorder:
        kwargs.setdefault("spool_dir", spool_dir)
        kwargs.setdefault("flush_seconds", 3600)
        recorder = Recorder(**kwargs)
        created.append(recorder)
        return recorder

    yield make
    for recorder in created:
        recorder.stop(timeout=5)


@pytest.fixture
def recorder(make_recorder: Callable[..., Recorder], monkeypatch: pytest.MonkeyPatch) -> Recorder:
    """The process singleton that `record_call` uses, replaced by a test recorder."""
    instance = make_recorder()
    monkeypatch.setattr(recorder_module, "_recorder", instance)
    return instance


@pytest.fixture
def flaky_writes(monkeypatch: pytest.MonkeyPatch) -> Callable[..., FlakyWrites]:
    def install(**kwargs: Any) -> FlakyWrites:
        flaky = FlakyWrites(**kwargs)
        monkeypatch.setattr(recorder_module, "calls_write", flaky)
        return flaky

    return install


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def usage_log() -> Iterator[list[str]]:
    """Lines written to the `llmrotate.usage` logger (it does not propagate to caplog)."""
    logger = logging.getLogger("llmrotate.usage")
    handler = _ListHandler()
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler.lines
    logger.removeHandler(handler)
    logger.setLevel(old_level)
