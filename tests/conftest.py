"""Shared fixtures.

The suite runs twice (see the Makefile): once embedded (SQLite, in-process key state) and once
scaled out (Postgres + Redis). `LLMROTATE_TEST_LEG` says which; tests that only make sense in
one leg use the `scaled` / `embedded` markers.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator

import httpx
import pytest

from fake_upstream import FakeUpstream

LEG = os.environ.get("LLMROTATE_TEST_LEG", "embedded")
REDIS_TEST_URL = os.environ.get("LLMROTATE_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def redis_available(url: str = REDIS_TEST_URL) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
    except redis.exceptions.RedisError:
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "scaled" in item.keywords and LEG != "scaled":
            item.add_marker(pytest.mark.skip(reason="runs in the scaled-out leg (make test)"))
        if "embedded" in item.keywords and LEG != "embedded":
            item.add_marker(pytest.mark.skip(reason="runs in the embedded leg"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session", autouse=True)
def _recorder_stopped_before_the_test_database_goes(django_db_setup: None) -> Iterator[None]:
    """The recorder thread holds its own connection; close it before the test DB is dropped."""
    yield
    from usage.recorder import get_recorder

    get_recorder().stop(timeout=10)


@pytest.fixture(autouse=True)
def _isolated_gateway_state() -> Iterator[None]:
    """Every test starts with empty key state and limits, no cached routing and the real
    network stack."""
    from common.upstream import set_transport_factory
    from healthchecks.gate import reset_breaker_gate
    from keys.auth import failed_auth_forget
    from keys.limits import get_limiter, reset_limiter
    from keys.routing import invalidate_routing_cache
    from keys.state_store import get_key_state_store, reset_key_state_store
    from usage.capture.selectors import capture_status_forget
    from usage.capture.writer import capture_writer_reset

    capture_writer_reset()  # a test's capture folder (settings) is read again
    capture_status_forget()  # and the dashboard's banner looks at it again
    reset_limiter()
    get_limiter().clear()  # the limits' counters too (in Redis: only under the test prefix)
    reset_key_state_store()
    # Also empties the Redis breaker store (same prefix); the database one rolls back per test.
    get_key_state_store().clear()
    reset_breaker_gate()  # this process's breaker copy and live-traffic windows
    invalidate_routing_cache()
    failed_auth_forget()  # no address starts locked out for earlier tests' bad tokens
    yield
    set_transport_factory(None)
    get_limiter().clear()
    reset_limiter()
    get_key_state_store().clear()
    reset_key_state_store()
    reset_breaker_gate()
    invalidate_routing_cache()
    capture_writer_reset()
    capture_status_forget()


@pytest.fixture
def mock_upstream() -> Iterator[Callable[[Callable[[httpx.Request], httpx.Response]], None]]:
    """Install an httpx.MockTransport handler for every upstream call of the proxy."""
    from common.upstream import set_transport_factory

    def install(handler: Callable[[httpx.Request], httpx.Response]) -> None:
        set_transport_factory(lambda: httpx.MockTransport(handler))

    yield install
    set_transport_factory(None)


@pytest.fixture
def flush_records() -> Callable[[], None]:
    from usage.recorder import get_recorder

    def flush() -> None:
        assert get_recorder().flush(timeout=10), "call records were not written in time"

    return flush


@pytest.fixture(scope="module")
def fake_upstream_server() -> Iterator[FakeUpstream]:
    """A fake upstream on 127.0.0.1 shared by a module's tests; `fake` resets it for each."""
    with FakeUpstream() as fake:
        yield fake


@pytest.fixture
def fake(fake_upstream_server: FakeUpstream) -> FakeUpstream:
    fake_upstream_server.reset()
    return fake_upstream_server
