"""Two gateway processes sharing Redis agree on key health: a cooldown one of them learned about
keeps the other from calling the upstream, and rotation and counters are shared.

Each worker is a real `manage.py serve` subprocess on the pytest test database (rows written with
transactional_db are committed, so the workers see them), with the test process's SECRET_KEY and
encryption keys so they can decrypt the upstream keys, and a Redis prefix of their own.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.utils import timezone

from fake_upstream import FakeUpstream
from keys.config_io import config_import
from keys.models import ClientToken
from keys.services import client_token_create
from keys.state_store import RedisKeyStateStore
from tests.conftest import free_port
from tests.e2e.conftest import (
    KEY_SECRETS,
    ROUTE,
    ServeProcess,
    gateway_config,
    scaled_worker_env,
    web_worker,
)

pytestmark = [pytest.mark.scaled, pytest.mark.timeout(60)]

CHAT = {"model": ROUTE, "messages": [{"role": "user", "content": "Say hi"}]}


@dataclass
class Workers:
    a: httpx.Client
    b: httpx.Client
    state: RedisKeyStateStore  # the workers' shared key state, read from this process
    upstream: FakeUpstream


def start_workers(
    tmp_path: Path,
    serve_processes: list[ServeProcess],
    *,
    token: str,
    prefix: str,
    cache_seconds: float = 5,
) -> list[str]:
    # Without the brute-force lockout: a test that polls with a token a worker does not know
    # yet, or no longer accepts, would get its 429 after 20 refusals, which hides what it waits
    # for (the lockout's tests: tests/hostile/test_auth.py).
    env = scaled_worker_env(
        prefix,
        tmp_path / "data",
        LLMROTATE_CONFIG_CACHE_SECONDS=str(cache_seconds),
        LLMROTATE_AUTH_FAILURES_PER_MINUTE="0",
    )
    urls = []
    for name in ("a", "b"):
        port = free_port()
        serve_processes.append(web_worker(port, env=env, log=tmp_path / f"worker-{name}.log"))
        urls.append(f"http://127.0.0.1:{port}")
    for process, url in zip(serve_processes, urls, strict=True):
        process.wait_ready(f"{url}/v1/models", headers={"Authorization": f"Bearer {token}"})
    return urls


@pytest.fixture
def workers_factory(
    transactional_db: None,
    fake_upstream: FakeUpstream,
    tmp_path: Path,
    serve_processes: list[ServeProcess],
) -> Iterator[Any]:
    assert settings.REDIS_URL, "the scaled leg sets REDIS_URL"
    prefix = f"llmrotate-e2e-{uuid.uuid4().hex[:12]}:"
    state = RedisKeyStateStore(settings.REDIS_URL, prefix=prefix)
    # The first admin exists already, as in any deployment past its first start: two workers
    # starting on an empty database would both try to create it.
    get_user_model().objects.create_superuser(username="admin", email="", password="x" * 20)
    clients: list[httpx.Client] = []

    def start(key_ids: tuple[str, ...], *, cache_seconds: float = 5) -> Workers:
        config = gateway_config(fake_upstream.base_url, strategy="round_robin", key_ids=key_ids)
        token = config_import(data=config).generated_tokens["e2e"]
        a, b = start_workers(
            tmp_path, serve_processes, token=token, prefix=prefix, cache_seconds=cache_seconds
        )
        headers = {"Authorization": f"Bearer {token}"}
        clients.extend(httpx.Client(base_url=url, headers=headers, timeout=20) for url in (a, b))
        return Workers(a=clients[0], b=clients[1], state=state, upstream=fake_upstream)

    yield start
    for client in clients:
        client.close()
    for process in serve_processes:  # before the test database is flushed: they write to it
        process.stop()
    state.clear()  # only this test's prefix
    state.close()


def test_a_cooldown_seen_by_one_worker_stops_the_other(workers_factory):
    workers: Workers = workers_factory(("key-a",))
    secret = KEY_SECRETS["key-a"]
    workers.upstream.script({"keys": {secret: {"queue": [{"fault": "429", "retry_after": 30}]}}})

    first = workers.a.post("/v1/chat/completions", json=CHAT)
    assert first.status_code == 503, first.text
    assert first.json()["error"]["code"] == "no_key_available"
    assert workers.upstream.stats()["total"] == 1

    t0 = time.monotonic()
    second = workers.b.post("/v1/chat/completions", json=CHAT)
    assert second.status_code == 503, second.text
    assert time.monotonic() - t0 < 2  # answered from the shared state, no upstream wait
    assert 28 <= int(second.headers["retry-after"]) <= 34
    # Worker B never asked the upstream: it knew from Redis that the only key was cooling down.
    assert workers.upstream.stats()["total"] == 1
    state, _ = workers.state.get_many(["key-a"], now=time.time())["key-a"]
    assert state.status == "cooldown"


def test_rotation_and_health_counters_are_shared(workers_factory):
    workers: Workers = workers_factory(("key-a", "key-b"))

    picked = []
    for client in (workers.a, workers.b, workers.a, workers.b):
        response = client.post("/v1/chat/completions", json=CHAT)
        assert response.status_code == 200, response.text
        picked.append(response.headers["x-llmrotate-key"])
    # One round-robin counter for both processes: consecutive calls alternate keys even when
    # they land on different workers (two private counters would both start on the same key).
    assert picked[0] != picked[1]
    assert picked[0] == picked[2] and picked[1] == picked[3]

    states = workers.state.get_many(["key-a", "key-b"], now=time.time())
    assert {key: s.total_successes for key, (s, _) in states.items()} == {"key-a": 2, "key-b": 2}
    counts = workers.upstream.stats()["requests"]
    assert counts == {KEY_SECRETS["key-a"]: 2, KEY_SECRETS["key-b"]: 2}


def test_a_revocation_reaches_both_workers_within_the_bound(workers_factory):
    ttl = 1.0
    workers: Workers = workers_factory(("key-a",), cache_seconds=ttl)
    _, token = client_token_create(name="grafana", routes=["*"], scopes=["proxy", "monitor"])
    auth = {"Authorization": f"Bearer {token}"}

    def statuses() -> set[int]:
        return {
            client.get(path, headers=auth).status_code
            for client in (workers.a, workers.b)
            for path in ("/api/usage", "/v1/models")
        }

    # Both workers load the new token (created by this process, which neither of them is).
    deadline = time.monotonic() + 2 * ttl + 5
    while statuses() != {200}:
        assert time.monotonic() < deadline, "the new token did not reach both workers"
        time.sleep(0.1)
    # Revoked as `manage.py revoke_token` would, from yet another process.
    ClientToken.objects.filter(name="grafana").update(revoked_at=timezone.now())
    deadline = time.monotonic() + 2 * ttl + 5
    while statuses() != {401}:
        assert time.monotonic() < deadline, "a worker still accepts the revoked token"
        time.sleep(0.1)
