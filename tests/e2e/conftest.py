"""End-to-end fixtures: the real ASGI app in a real uvicorn server, a real fake upstream, and the
official SDKs talking to both over 127.0.0.1 sockets. No MockTransport anywhere.

The gateway runs in a background thread of the test process (its own event loop), so tests can
still look at the key state store and the database directly; `transactional_db` makes the
configuration the test writes visible to the server thread. Tests that need separate gateway
processes (test_two_workers.py, test_serve_command.py) start `manage.py serve` themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx
import openai
import pytest
import uvicorn

from fake_upstream import FakeUpstream
from tests.conftest import free_port

if TYPE_CHECKING:
    from tests.e2e.test_anthropic_sdk import Claude

REPO = Path(__file__).resolve().parents[2]
ROUTE = "gpt-4o-mini"
# Key id -> secret. Both look like real provider keys so that a leak would be unmistakable.
KEY_SECRETS = {
    "key-a": "sk-e2e-alpha-7Qm2xV9pLk3Rt8Ws1111",
    "key-b": "sk-e2e-bravo-4Hd6yB1nJc5Fe0Zu2222",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).is_relative_to(here):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def _fake_upstream_server() -> Iterator[FakeUpstream]:
    fake = FakeUpstream()
    fake.start_in_thread("127.0.0.1")
    yield fake
    fake.stop()


@pytest.fixture
def fake_upstream(_fake_upstream_server: FakeUpstream) -> FakeUpstream:
    """A real fake OpenAI server on 127.0.0.1 with no scripts and zeroed counters."""
    _fake_upstream_server.reset()
    return _fake_upstream_server


class GatewayThread:
    """`llmrotate_site.asgi:application` in uvicorn, on a private event loop in a thread."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.config = uvicorn.Config(
            "llmrotate_site.asgi:application",
            host="127.0.0.1",
            port=port,
            lifespan="on",
            log_level="warning",
        )
        self.server = uvicorn.Server(self.config)
        self.failure: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="e2e-gateway", daemon=True)

    def _run(self) -> None:
        try:
            with asyncio.Runner(loop_factory=self.config.get_loop_factory()) as runner:
                runner.run(self._serve())
        except BaseException as exc:  # uvicorn raises SystemExit when startup fails
            self.failure = exc

    async def _serve(self) -> None:
        try:
            await self.server.serve()
        finally:
            await _close_loop_resources()

    def start(self, timeout: float = 15.0) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.thread.is_alive():
                raise RuntimeError(f"the gateway did not start: {self.failure!r}")
            if self.server.started and _accepts_connections(self.port):
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"the gateway did not accept connections within {timeout}s")

    def stop(self, timeout: float = 15.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the gateway thread did not stop"


async def _close_loop_resources() -> None:
    """Close what the server's loop opened and would otherwise leak past it: the Redis client
    of this loop, and the database connections of asgiref's thread and of the gateway's own
    (which would keep Postgres from dropping the test database)."""
    from asgiref.sync import sync_to_async
    from django.db import connections

    from common.db import db_thread_close
    from keys.state_store import RedisKeyStateStore, get_key_state_store

    store = get_key_state_store()
    if isinstance(store, RedisKeyStateStore):
        await store.aclose()
    await sync_to_async(connections.close_all, thread_sensitive=True)()
    await db_thread_close()


def _accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def gateway_config(
    base_url: str,
    *,
    strategy: str = "round_robin",
    priorities: dict[str, int] | None = None,
    key_ids: tuple[str, ...] = ("key-a", "key-b"),
) -> dict[str, Any]:
    priorities = priorities or {}
    return {
        "providers": {
            "fake": {
                "kind": "openai",
                "base_url": base_url,
                "cooldown_seconds": 30,
                "quarantine_seconds": 300,
            }
        },
        "keys": [
            {
                "id": key_id,
                "provider": "fake",
                "secret": f"literal://{KEY_SECRETS[key_id]}",
                "priority": priorities.get(key_id, 0),
            }
            for key_id in key_ids
        ],
        "routes": {
            ROUTE: {"strategy": strategy, "deployments": [{"provider": "fake", "model": ROUTE}]}
        },
        "clients": [{"name": "e2e", "routes": ["*"], "scopes": ["proxy"]}],
    }


@dataclass
class LiveGateway:
    base_url: str  # http://127.0.0.1:<port>, without /v1
    token: str
    secrets: dict[str, str]  # key id -> upstream secret
    upstream: FakeUpstream
    _clients: list[openai.OpenAI] = field(default_factory=list)

    def configure(self, *, strategy: str, priorities: dict[str, int] | None = None) -> None:
        """Re-import the configuration (same keys and token); the server sees it at once."""
        from keys.config_io import config_import

        config_import(
            data=gateway_config(self.upstream.base_url, strategy=strategy, priorities=priorities)
        )

    def prefer(self, first: str) -> None:
        """Make `first` the key every call tries first (health_aware orders by priority), so
        a scripted fault on it is always the first attempt."""
        self.configure(
            strategy="health_aware",
            priorities={k: (0 if k == first else 1) for k in self.secrets},
        )

    def openai(self, token: str | None = None) -> openai.OpenAI:
        client = openai.OpenAI(
            base_url=f"{self.base_url}/v1", api_key=token or self.token, max_retries=0, timeout=20
        )
        self._clients.append(client)
        return client

    def requests_per_key(self) -> dict[str, int]:
        """Requests the fake upstream received (chat completions, model lists), by key id."""
        counts = self.upstream.stats()["requests"]
        return {key_id: counts.get(secret, 0) for key_id, secret in self.secrets.items()}

    def script(self, **per_key: list[dict[str, Any]] | dict[str, Any]) -> None:
        """`script(key_a=[...queue...])` or `script(key_a={"default": {...}})`, by key id."""
        keys: dict[str, Any] = {}
        for name, spec in per_key.items():
            secret = self.secrets[name.replace("_", "-")]
            keys[secret] = spec if isinstance(spec, dict) else {"queue": spec}
        self.upstream.script({"keys": keys})


@pytest.fixture
def live_gateway(transactional_db: None, fake_upstream: FakeUpstream) -> Iterator[LiveGateway]:
    """The gateway, configured with two keys on the fake upstream and a round-robin route."""
    from keys.config_io import config_import
    from usage.recorder import get_recorder

    report = config_import(data=gateway_config(fake_upstream.base_url))
    server = GatewayThread(free_port())
    server.start()
    gateway = LiveGateway(
        base_url=f"http://127.0.0.1:{server.port}",
        token=report.generated_tokens["e2e"],
        secrets=dict(KEY_SECRETS),
        upstream=fake_upstream,
    )
    try:
        yield gateway
    finally:
        for client in gateway._clients:
            client.close()
        server.stop()
        # Database connections the server's request threads left open (see
        # test_db_connections.py) close when collected; without this Postgres could not drop
        # the test database at the end of the run.
        gc.collect()
        # The lifespan shutdown already flushed and stopped the recorder; this writes anything
        # recorded since (a test's own flush restarts it), while this test's database exists,
        # and leaves no recorder thread behind.
        assert get_recorder().stop(timeout=10), "call records were not written in time"


@pytest.fixture
def claude(live_gateway: LiveGateway) -> Iterator[Claude]:
    """The live gateway with an Anthropic provider on the same fake server, next to the OpenAI
    one (test_anthropic_sdk.py)."""
    from keys.config_io import config_import
    from tests.e2e.test_anthropic_sdk import Claude, anthropic_config

    config_import(data=anthropic_config(live_gateway.upstream.base_url))
    helper = Claude(live=live_gateway)
    yield helper
    for client in helper._clients:
        client.close()


@pytest.fixture
def captures(settings: Any, tmp_path: Path) -> Path:
    """A capture folder of the test's own (LLMROTATE_CAPTURE_DIR), empty until a capture rule
    and a call put something there."""
    folder = tmp_path / "captures"
    settings.LLMROTATE_CAPTURE_DIR = folder
    return folder


@pytest.fixture
def client(live_gateway: LiveGateway) -> openai.OpenAI:
    """The official OpenAI SDK pointed at the live gateway, with the SDK's retries off."""
    return live_gateway.openai()


class RawCapture(logging.Handler):
    """Keeps each record's text as it was logged: installed first on its logger, it runs before
    the handlers whose redacting filter rewrites the record, so it sees what the code wrote."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + logging.Formatter().formatException(record.exc_info)
        self.lines.append(text)

    @contextlib.contextmanager
    def installed_on(self, logger: logging.Logger) -> Iterator[RawCapture]:
        logger.handlers.insert(0, self)
        try:
            yield self
        finally:
            logger.removeHandler(self)


@pytest.fixture
def usage_log() -> Iterator[Callable[[], list[dict[str, Any]]]]:
    """The JSON lines logged on `llmrotate.usage` (which does not propagate, so caplog would
    not see them), parsed."""
    with RawCapture().installed_on(logging.getLogger("llmrotate.usage")) as capture:
        yield lambda: [json.loads(line) for line in capture.lines]


@pytest.fixture
def raw_log() -> Iterator[RawCapture]:
    """Every record that reaches the root logger, at DEBUG, before the redacting filter."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.DEBUG)
    try:
        with RawCapture().installed_on(root) as capture:
            yield capture
    finally:
        root.setLevel(level)


def wait_for(predicate: Callable[[], Any], *, timeout: float = 10, message: str = "") -> Any:
    """Poll until `predicate()` is truthy and return it. A stream's record and key state are
    settled just after its last byte reaches the client, so tests wait instead of racing."""
    from django.db import OperationalError

    deadline = time.monotonic() + timeout
    while True:
        try:
            result = predicate()
        except OperationalError:  # SQLite's shared in-memory DB: a read met the flusher's write
            result = None
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(message or "condition not met in time")
        time.sleep(0.05)


def call_records(count: int, *, timeout: float = 10) -> list[Any]:
    """Exactly `count` CallRecord rows (by start time, then attempt), once they are written."""
    from usage.models import CallRecord
    from usage.recorder import get_recorder

    def ready() -> list[Any] | None:
        assert get_recorder().flush(timeout=timeout)
        rows = list(CallRecord.objects.order_by("started_at", "attempt"))
        assert len(rows) <= count, f"more call records than expected: {rows}"
        return rows if len(rows) == count else None

    return wait_for(ready, timeout=timeout, message=f"expected {count} call records")


def env_without(*names: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in names}
    env.update(extra)
    return env


class ServeProcess:
    """`manage.py serve` in a subprocess, its output in a file (a pipe could fill and block)."""

    def __init__(self, args: list[str], *, env: dict[str, str], log: Path) -> None:
        self.args = args
        self.log = log
        self._log_file = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "manage.py"), "serve", *args],
            cwd=REPO,
            env={**env, "PYTHONUNBUFFERED": "1"},
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(
        self,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        timeout: float = 30,
        status: int | None = 200,
    ) -> None:
        """Poll `url` until it answers `status` (None: anything at all); fail early (with the
        log) if the process dies."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                answered = httpx.get(url, headers=headers, timeout=1).status_code
                if status is None or answered == status:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"serve was not ready within {timeout}s:\n{self.output()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int | None:
        """Signal the process (by its own pid), wait, kill it if it does not stop in time.
        Returns the exit code, or None if it had to be killed."""
        code: int | None = None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                code = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        else:
            code = self.proc.returncode
        self._log_file.close()
        return code


def database_url() -> str:
    """The URL of the test database pytest-django created (and this process uses)."""
    from django.db import connection

    db = connection.settings_dict
    assert db["ENGINE"] == "django.db.backends.postgresql"
    user = quote(db["USER"] or "", safe="")
    password = f":{quote(db['PASSWORD'], safe='')}" if db["PASSWORD"] else ""
    host = db["HOST"] or "127.0.0.1"
    port = f":{db['PORT']}" if db["PORT"] else ""
    return f"postgres://{user}{password}@{host}{port}/{db['NAME']}"


def scaled_worker_env(prefix: str, data_dir: Path, **extra: str) -> dict[str, str]:
    """The environment of a gateway process on the test database and Redis (the scaled leg),
    under its own Redis prefix and data directory, with this process's secrets (so that it can
    decrypt the upstream keys the test wrote) and quiet logs."""
    from django.conf import settings

    return env_without(
        "LLMROTATE_TEST_LEG",
        DATABASE_URL=database_url(),
        REDIS_URL=settings.REDIS_URL,
        LLMROTATE_REDIS_PREFIX=prefix,
        SECRET_KEY=settings.SECRET_KEY,
        LLMROTATE_ENCRYPTION_KEYS=",".join(settings.LLMROTATE_ENCRYPTION_KEYS),
        LLMROTATE_DATA_DIR=str(data_dir),
        LOG_LEVEL="WARNING",
        LLMROTATE_USAGE_LOG_LEVEL="WARNING",
        **extra,
    )


def web_worker(port: int, *, env: dict[str, str], log: Path, workers: int = 1) -> ServeProcess:
    """`serve` with the web process only, on `port`: the Celery worker and beat `serve` would
    also start are not what these tests are about (and a deployment runs exactly one beat)."""
    args = ["--port", str(port), "--no-access-log", "--no-worker", "--no-beat"]
    if workers != 1:
        args += ["--workers", str(workers)]
    return ServeProcess(args, env=env, log=log)


def metric_sum(base_url: str, token: str, name: str, **labels: str) -> float:
    """The sum of a series' samples on a gateway's /metrics, those with `labels` only."""
    from prometheus_client.parser import text_string_to_metric_families

    response = httpx.get(
        f"{base_url}/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=10
    )
    assert response.status_code == 200, response.text
    return sum(
        sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


@pytest.fixture
def serve_processes() -> Iterator[list[ServeProcess]]:
    """Tests append the ServeProcess they start; whatever is still running is stopped."""
    started: list[ServeProcess] = []
    yield started
    for process in started:
        process.stop()
