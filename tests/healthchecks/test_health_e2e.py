"""End to end: a real gateway (`manage.py serve`: web, Celery worker, Celery beat) probing a
real fake upstream on loopback, in this leg's mode: the embedded filesystem broker on SQLite, or
Redis and Postgres when scaled out.

Take the primary upstream down: within its failure threshold the probes open its breaker, and
the proxy sends traffic to the next deployment without trying it. Bring it back: half-open, then
closed. A webhook receiver gets every change, correctly signed.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest

from fake_upstream import FakeUpstream
from tests.conftest import LEG, free_port
from tests.e2e.conftest import REPO, ServeProcess, env_without
from tests.healthchecks.conftest import WebhookReceiver, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

TOKEN = "llmr_e2ehealt_0123456789abcdefghijklmnopqrstuv"
SECRET = "whsec-e2e-health-0123456789abcdef"
CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
THRESHOLD = 2  # HTTP failures in a row that take an endpoint down
FAST = {
    "LLMROTATE_PROBE_TICK_SECONDS": "1",
    "LLMROTATE_HTTP_PROBE_INTERVAL_SECONDS": "1",
    "LLMROTATE_PING_INTERVAL_SECONDS": "1",
    "LLMROTATE_HTTP_PROBE_FAILURE_THRESHOLD": str(THRESHOLD),
    "LLMROTATE_HTTP_PROBE_TIMEOUT_SECONDS": "1",
    # Long enough to watch routing skip the endpoint, short enough to watch it come back.
    "LLMROTATE_BREAKER_OPEN_SECONDS": "4",
    "LLMROTATE_BREAKER_SYNC_SECONDS": "0.3",
    "LLMROTATE_BROKER_POLL_SECONDS": "0.1",
    "LLMROTATE_WEBHOOK_SECRET": SECRET,
}


def config(primary: str, backup: str) -> str:
    return f"""
providers:
  # A short key cooldown: the requests routing sends before the breaker opens fail with
  # connection errors, and a run of them cools the primary's key (30 s by default), which
  # would keep traffic off the primary after its breaker closes, whatever the breaker says.
  primary: {{kind: openai, base_url: "{primary}", cooldown_seconds: 1}}
  backup: {{kind: openai, base_url: "{backup}"}}
keys:
  - {{id: primary-1, provider: primary, secret: "literal://sk-e2e-primary-0123456789abcd"}}
  - {{id: backup-1, provider: backup, secret: "literal://sk-e2e-backup-0123456789abcde"}}
routes:
  chat:
    deployments: [{{provider: primary, model: gpt-4o-mini}}, {{provider: backup, model: gpt-4o}}]
clients:
  - {{name: e2e, token: "literal://{TOKEN}", routes: ["*"], scopes: [proxy, monitor]}}
"""


@pytest.fixture
def leg_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """The gateway's environment for this leg, on a database and Redis prefix of its own."""
    base = env_without(
        "DATABASE_URL", "REDIS_URL", "SECRET_KEY", "LLMROTATE_ENCRYPTION_KEYS",
        "LLMROTATE_REDIS_PREFIX", "LLMROTATE_CELERY_QUEUE", "LLMROTATE_WEBHOOK_URLS",
        LLMROTATE_DATA_DIR=str(tmp_path / "data"), **FAST,
    )  # fmt: skip
    if LEG != "scaled":
        yield base  # SQLite in the data directory, filesystem broker under it
        return
    import psycopg
    import redis

    name = f"e2e_health_{uuid.uuid4().hex[:10]}"
    server = urlsplit(os.environ["DATABASE_URL"])
    admin_url = urlunsplit(server._replace(path="/postgres"))
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    redis_url = os.environ["REDIS_URL"]
    try:
        yield {
            **base,
            "DATABASE_URL": urlunsplit(server._replace(path=f"/{name}")),
            "REDIS_URL": redis_url,
            "LLMROTATE_REDIS_PREFIX": f"{name}:",
            "LLMROTATE_CELERY_QUEUE": name,
        }
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        client = redis.Redis.from_url(redis_url)
        stale = list(client.scan_iter(match=f"*{name}*", count=500))
        if stale:
            client.delete(*stale)
        client.close()


def manage(env: dict[str, str], *args: str) -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "manage.py"), *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def verified(receiver: WebhookReceiver) -> list[str]:
    """The events received so far, each checked against its signature, in the order they
    happened (deliveries run concurrently, so they may arrive in another)."""
    for delivery in receiver.deliveries:
        expected = "sha256=" + hmac.new(SECRET.encode(), delivery.body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(delivery.headers["X-Llmrotate-Signature"], expected)
        assert delivery.headers["X-Llmrotate-Timestamp"] == str(delivery.json()["timestamp"])
    bodies = sorted((d.json() for d in receiver.deliveries), key=lambda b: b["occurred_at"])
    return [body["event"] for body in bodies]


def in_order(events: list[str], *wanted: str) -> bool:
    position = 0
    for event in events:
        if position < len(wanted) and event == wanted[position]:
            position += 1
    return position == len(wanted)


def test_a_down_upstream_is_taken_out_of_routing_and_comes_back(
    tmp_path: Path,
    leg_env: dict[str, str],
    webhook_receiver: WebhookReceiver,
    serve_processes: list[ServeProcess],
):
    primary, backup = FakeUpstream(), FakeUpstream()
    primary.start_in_thread("127.0.0.1")
    backup.start_in_thread("127.0.0.1")
    restarted: list[FakeUpstream] = []
    try:
        env = {**leg_env, "LLMROTATE_WEBHOOK_URLS": webhook_receiver.url}
        (tmp_path / "llmrotate.yaml").write_text(config(primary.base_url, backup.base_url))
        manage(env, "serve", "--setup-only")
        manage(env, "import_config", str(tmp_path / "llmrotate.yaml"))
        port = free_port()
        server = ServeProcess(["--port", str(port), "--no-access-log"], env=env,
                              log=tmp_path / "serve.log")  # fmt: skip
        serve_processes.append(server)
        gateway = f"http://127.0.0.1:{port}"
        server.wait_ready(f"{gateway}/healthz")
        run_scenario(gateway, primary, backup, restarted, webhook_receiver, server)
    finally:
        for fake in (primary, backup, *restarted):
            fake.stop()


def run_scenario(
    gateway: str,
    primary: FakeUpstream,
    backup: FakeUpstream,
    restarted: list[FakeUpstream],
    receiver: WebhookReceiver,
    server: ServeProcess,
) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    http = httpx.Client(base_url=gateway, timeout=15)

    def primary_health() -> dict[str, Any]:
        return http.get("/internal/health").json()["endpoint_health"][primary.base_url]

    def until(predicate: Callable[[], Any], what: str, timeout: float = 30) -> Any:
        return wait_until(predicate, timeout=timeout, message=f"{what}:\n{server.output()}")

    # Probes run: the primary is up and serves the traffic.
    until(lambda: primary_health()["http_status"] == "ok", "the HTTP probe never ran")
    answer = http.post("/v1/chat/completions", json=CHAT, headers=auth)
    assert answer.status_code == 200 and answer.headers["x-llmrotate-key"] == "primary-1"
    # The probe authenticated with the provider's own key.
    assert primary.stats()["requests"].get("sk-e2e-primary-0123456789abcd", 0) >= 2

    # Down: the breaker opens once the HTTP probe has failed THRESHOLD times in a row.
    port = primary.port
    primary.stop()
    down_at = time.monotonic()
    health = until(lambda: (h := primary_health())["breaker_state"] == "open" and h, "no trip")
    took = time.monotonic() - down_at
    failures = health["consecutive_failures"]
    # THRESHOLD HTTP failures take it down; failed pings count too once the HTTP probe fails
    # (healthchecks.services._probes_down), so a ping that timed out on a loaded machine can
    # trip it at the first HTTP failure (seen once in CI).
    assert 1 <= failures["http"] <= THRESHOLD
    if failures["http"] < THRESHOLD:
        assert failures["ping"] > 0 or health["ping_status"] == "failed", health
    assert health["healthy"] is False and health["http_status"] == "failed"
    assert took < THRESHOLD * 1 + 8, f"opened after {took:.1f}s"  # 1 s probes, loaded CI

    # Routing skips it: one attempt, straight to the backup, once the web process has seen
    # the worker's trip (within LLMROTATE_BREAKER_SYNC_SECONDS; the open period is 4 s).
    def straight_to_backup() -> bool:
        answer = http.post("/v1/chat/completions", json=CHAT, headers=auth)
        assert answer.status_code == 200, answer.text
        return answer.headers["x-llmrotate-key"] == "backup-1" and (
            answer.headers["x-llmrotate-attempts"] == "1"
        )

    until(straight_to_backup, "routing still tries the open endpoint", timeout=3)
    assert http.get("/internal/health").json()["summary"] == {
        "total": 2, "healthy": 1, "unhealthy": 1,
    }  # fmt: skip
    until(lambda: in_order(verified(receiver), "breaker.open"), "no breaker.open webhook")
    until(lambda: "endpoint.down" in verified(receiver), "no endpoint.down webhook")

    # Back: after the open period, half-open; the next HTTP probe is the trial and closes it.
    revived = FakeUpstream()
    restarted.append(revived)
    revived.start_in_thread("127.0.0.1", port)
    until(
        lambda: in_order(verified(receiver), "breaker.open", "breaker.half_open", "breaker.closed"),
        "the breaker did not go half-open, then closed",
    )
    until(lambda: "endpoint.up" in verified(receiver), "no endpoint.up webhook")
    health = primary_health()
    assert health["breaker_state"] == "closed" and health["healthy"] is True
    # Traffic returns to the primary once the web process has seen the close.
    until(
        lambda: (
            http.post("/v1/chat/completions", json=CHAT, headers=auth).headers["x-llmrotate-key"]
            == "primary-1"
        ),
        "traffic did not return to the primary",
        timeout=3,
    )
    assert backup.stats()["requests"].get("sk-e2e-backup-0123456789abcde", 0) >= 1
    http.close()
    assert "Traceback" not in server.output(), server.output()
