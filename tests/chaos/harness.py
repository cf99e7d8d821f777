"""What the fault campaign runs on: a Postgres and a Redis of its own (so that stopping them
stops nobody else's), the gateway as `manage.py serve` in its own processes, a fake upstream
with OpenAI and Anthropic providers, and steady traffic from the official SDKs.

Every scenario asks the same questions at the end (docs/reliability.md): did every call end in
a success or a documented error within the deadline, does the number of call records equal the
number of attempts the upstream saw, and are the keys healthy and idle again.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import psycopg
import redis

from fake_upstream import FakeUpstream
from keys.state_store_redis import PROCESS_ALIVE_SECONDS
from tests.conftest import free_port
from tests.e2e.conftest import REPO, ServeProcess, env_without, wait_for

PG_BIN = Path("/usr/lib/postgresql/15/bin")
GPT, CLAUDE = "chaos-gpt", "chaos-claude"
OPENAI_SECRETS = {"oa-1": "sk-chaos-openai-one", "oa-2": "sk-chaos-openai-two"}
ANTHROPIC_SECRETS = {"an-1": "sk-ant-chaos-one", "an-2": "sk-ant-chaos-two"}
# What a call may answer besides 200 while a dependency is away (docs/errors.md): none of these
# is a 500, and each comes in the caller's error envelope.
DOCUMENTED_ERRORS = {429, 502, 503, 504}
CALL_DEADLINE_SECONDS = 15.0


def _as_postgres(args: list[str]) -> list[str]:
    # initdb and postgres refuse to run as root; CI runs as root, a laptop does not.
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


class OwnPostgres:
    """A Postgres cluster in a temporary folder on a free port, with `pg_ctl`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.port = free_port()
        root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(root, "postgres")
        subprocess.run(
            _as_postgres(
                [
                    str(PG_BIN / "initdb"),
                    "-D",
                    str(self.data),
                    "-A",
                    "trust",
                    "-U",
                    "postgres",
                    "--no-sync",
                    "-E",
                    "UTF8",
                ]
            ),
            check=True,
            capture_output=True,
        )
        self.start()

    def url(self, database: str) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        subprocess.run(
            _as_postgres(
                [
                    str(PG_BIN / "pg_ctl"),
                    "-D",
                    str(self.data),
                    "-o",
                    options,
                    "-l",
                    str(self.root / "log"),
                    "-w",
                    "start",
                ]
            ),
            check=True,
            capture_output=True,
        )

    def stop(self) -> None:
        """A fast stop: sessions are ended, as when the database server goes down."""
        subprocess.run(
            _as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "stop"]),
            check=True,
            capture_output=True,
        )

    def execute(self, database: str, sql: str) -> Any:
        with psycopg.connect(self.url(database), autocommit=True, connect_timeout=5) as conn:
            cursor = conn.execute(sql)
            return cursor.fetchone() if cursor.description else None

    def close(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop()


class OwnRedis:
    """A redis-server on a free port, nothing on disk."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--loglevel",
                "warning",
                # DEBUG SLEEP (sleep_in_background); Redis 7 refuses DEBUG unless allowed.
                "--enable-debug-command",
                "local",
            ],
            stdout=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_timeout=1)
        wait_for(lambda: _pings(client), timeout=10, message="redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def sleep_in_background(self, seconds: float) -> Sleeper:
        """`DEBUG SLEEP`: the server accepts connections and answers nothing for `seconds`."""
        sleeper = Sleeper(self.port, seconds)
        sleeper.start()
        return sleeper

    close = stop


class Sleeper(threading.Thread):
    """Runs `DEBUG SLEEP`; `slept` is how long the server was silent (None: it never was, and
    `error` says why), so that a scenario cannot pass without the stall it is about."""

    def __init__(self, port: int, seconds: float) -> None:
        super().__init__(daemon=True)
        self.port, self.seconds = port, seconds
        self.slept: float | None = None
        self.error: Exception | None = None

    def run(self) -> None:
        client = redis.Redis(port=self.port, socket_timeout=self.seconds + 10)
        t0 = time.monotonic()
        try:
            client.execute_command("DEBUG", "SLEEP", str(self.seconds))
        except redis.RedisError as exc:
            self.error = exc
        else:
            self.slept = time.monotonic() - t0
        finally:
            client.close()


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def gateway_config(base_url: str) -> dict[str, Any]:
    """Two providers on the fake upstream, two keys each, a route for each, a client token
    for traffic and one for monitoring."""

    def keys(provider: str, secrets: dict[str, str]) -> list[dict[str, Any]]:
        return [
            {"id": key_id, "provider": provider, "secret": f"literal://{secret}"}
            for key_id, secret in secrets.items()
        ]

    return {
        "providers": {
            "fake-openai": {"kind": "openai", "base_url": base_url, "cooldown_seconds": 5},
            "fake-anthropic": {"kind": "anthropic", "base_url": base_url, "cooldown_seconds": 5},
        },
        "keys": keys("fake-openai", OPENAI_SECRETS) + keys("fake-anthropic", ANTHROPIC_SECRETS),
        "routes": {
            GPT: {
                "strategy": "round_robin",
                "deployments": [{"provider": "fake-openai", "model": "gpt-4o-mini"}],
            },
            CLAUDE: {
                "strategy": "round_robin",
                "deployments": [{"provider": "fake-anthropic", "model": "claude-3-5-haiku"}],
            },
        },
        "clients": [
            {"name": "chaos", "routes": ["*"], "scopes": ["proxy"]},
            {"name": "chaos-monitor", "routes": ["*"], "scopes": ["monitor"]},
        ],
    }


@dataclass
class Gateway:
    """`manage.py serve` (web process only unless asked) on a data folder and database of its
    own; it can be stopped, killed and started again on the same state."""

    env: dict[str, str]
    root: Path
    upstream: FakeUpstream
    port: int = field(default_factory=free_port)
    tokens: dict[str, str] = field(default_factory=dict)
    process: ServeProcess | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set_up(self, *, migrate: bool = True) -> None:
        """Migrations (unless the database is a migrated copy) and the configuration (which
        prints the generated tokens once)."""
        if migrate:
            manage(self.env, "migrate", "-v0")
        config = self.root / "config.json"
        config.write_text(json.dumps(gateway_config(self.upstream.base_url)))
        for line in manage(self.env, "import_config", str(config)).splitlines():
            name, _, token = line.strip().partition(": ")
            if token.startswith("llmr_"):
                self.tokens[name] = token
        assert set(self.tokens) == {"chaos", "chaos-monitor"}, self.tokens

    def start(self, *extra: str) -> None:
        self.starts += 1
        args = ["--port", str(self.port), "--no-access-log", *extra]
        self.process = ServeProcess(args, env=self.env, log=self.root / f"serve-{self.starts}.log")
        self.process.wait_ready(
            f"{self.url}/v1/models",
            headers={"Authorization": f"Bearer {self.tokens['chaos']}"},
            timeout=60,
        )

    def web_pid(self) -> int:
        """The uvicorn process `serve` started (serve itself is the supervisor)."""
        assert self.process is not None
        return _child_pids(self.process.proc.pid, "uvicorn")[0]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 45) -> int | None:
        assert self.process is not None
        return self.process.stop(sig, timeout=timeout)

    def output(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.root.glob("serve-*")))

    def key_states(self) -> list[dict[str, Any]]:
        answer = httpx.get(
            f"{self.url}/api/keys",
            headers={"Authorization": f"Bearer {self.tokens['chaos-monitor']}"},
            timeout=10,
        )
        assert answer.status_code == 200, answer.text
        keys: list[dict[str, Any]] = answer.json()["keys"]
        return keys

    def healthz(self) -> httpx.Response:
        return httpx.get(f"{self.url}/healthz", timeout=10)

    def close(self) -> None:
        if self.process is not None:
            self.process.stop(signal.SIGKILL if self.process.proc.poll() is None else 0)


def manage(env: dict[str, str], *args: str) -> str:
    """A `manage.py` command in a process of its own, with `env`; its output."""
    done = subprocess.run(
        [sys.executable, str(REPO / "manage.py"), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _child_pids(parent: int, marker: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and marker in cmdline:
            pids.append(int(entry.name))
    assert pids, f"no child of {parent} runs {marker}"
    return pids


def scaled_env(root: Path, *, database_url: str, redis_url: str, **extra: str) -> dict[str, str]:
    return _env(root, DATABASE_URL=database_url, REDIS_URL=redis_url, **extra)


def embedded_env(root: Path, **extra: str) -> dict[str, str]:
    env = _env(root, **extra)
    env.pop("DATABASE_URL", None)
    env.pop("REDIS_URL", None)
    return env


def _env(root: Path, **extra: str) -> dict[str, str]:
    return env_without(
        "LLMROTATE_TEST_LEG",
        "DATABASE_URL",
        "REDIS_URL",
        "SECRET_KEY",
        "LLMROTATE_ENCRYPTION_KEYS",
        LLMROTATE_DATA_DIR=str(root / "data"),
        LLMROTATE_REDIS_PREFIX=f"chaos-{root.name}:",
        LOG_LEVEL="WARNING",
        LLMROTATE_USAGE_LOG_LEVEL="WARNING",
        LLMROTATE_RECORD_FLUSH_SECONDS="0.5",
        **extra,
    )


@dataclass
class Outcomes:
    """What every call of the traffic got, and how long the slowest took."""

    counts: Counter[str] = field(default_factory=Counter)
    undocumented: list[str] = field(default_factory=list)
    slowest: float = 0.0
    # (start, end, outcome) of every call, on time.monotonic()
    spans: list[tuple[float, float, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, outcome: str, started: float, problem: str | None = None) -> None:
        ended = time.monotonic()
        with self.lock:
            self.counts[outcome] += 1
            self.slowest = max(self.slowest, ended - started)
            self.spans.append((started, ended, outcome))
            if problem is not None and len(self.undocumented) < 20:
                self.undocumented.append(problem)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def across(self, moment: float) -> Counter[str]:
        """The outcomes of the calls that were in flight at `moment`."""
        return Counter(outcome for start, end, outcome in self.spans if start < moment < end)


class Traffic:
    """Steady calls from the official SDKs, JSON and streamed, to both providers, from a few
    threads, until stopped. A connection error is an outcome too (the gateway may be down on
    purpose); what must never happen is a 500, an error outside the caller's envelope, or a
    call slower than the deadline."""

    def __init__(self, gateway: Gateway, *, threads: int = 4, pause: float = 0.3) -> None:
        self.gateway = gateway
        # Steady, not flat out: the campaign runs beside the test legs in `make test`, and what
        # it measures (losses, stalls, states) does not need a saturated gateway.
        self._pause = pause
        self.outcomes = Outcomes()
        self._stop = threading.Event()
        self._started: dict[int, float] = {}  # thread -> start of its call in flight
        self._threads = [
            threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(threads)
        ]

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> Outcomes:
        self._stop.set()
        for thread in self._threads:
            thread.join(CALL_DEADLINE_SECONDS + 5)
        return self.outcomes

    def wait_calls(self, count: int, timeout: float = 30) -> None:
        """Until `count` more calls have ended."""
        target = self.outcomes.total + count
        wait_for(lambda: self.outcomes.total >= target, timeout=timeout, message="no traffic")

    def in_flight(self, *, longer_than: float) -> int:
        """How many calls have been running for longer than `longer_than` seconds: streams
        in the middle, as the JSON calls end in milliseconds."""
        now = time.monotonic()
        return sum(1 for started in list(self._started.values()) if now - started > longer_than)

    def _run(self, n: int) -> None:
        token = self.gateway.tokens["chaos"]
        gpt = openai.OpenAI(
            base_url=f"{self.gateway.url}/v1",
            api_key=token,
            max_retries=0,
            timeout=CALL_DEADLINE_SECONDS,
        )
        claude = anthropic.Anthropic(
            base_url=self.gateway.url, api_key=token, max_retries=0, timeout=CALL_DEADLINE_SECONDS
        )
        calls: list[Callable[[], None]] = [
            lambda: _chat(gpt, stream=False),
            lambda: _chat(gpt, stream=True),
            lambda: _message(claude, stream=False),
            lambda: _message(claude, stream=True),
        ]
        turn = n
        while not self._stop.is_set():
            call = calls[turn % len(calls)]
            turn += 1
            started = self._started[n] = time.monotonic()
            outcome, problem = _outcome(call)
            del self._started[n]
            self.outcomes.add(outcome, started, problem)
            self._stop.wait(self._pause)


def _chat(client: openai.OpenAI, *, stream: bool) -> None:
    messages: Any = [{"role": "user", "content": "Say hi"}]
    if not stream:
        answer = client.chat.completions.create(model=GPT, messages=messages)
        assert answer.choices[0].message.content
        return
    chunks = client.chat.completions.create(
        model=GPT, messages=messages, stream=True, stream_options={"include_usage": True}
    )
    assert any(chunk.usage for chunk in chunks)


def _message(client: anthropic.Anthropic, *, stream: bool) -> None:
    messages: Any = [{"role": "user", "content": "Say hi"}]
    if not stream:
        answer = client.messages.create(model=CLAUDE, max_tokens=32, messages=messages)
        assert answer.content
        return
    with client.messages.stream(model=CLAUDE, max_tokens=32, messages=messages) as events:
        assert events.get_final_message().usage.output_tokens


def _outcome(call: Callable[[], None]) -> tuple[str, str | None]:
    """("ok" | "<status>" | "unreachable", what was wrong, if anything)."""
    try:
        call()
    except (openai.APIStatusError, anthropic.APIStatusError) as exc:
        body = exc.body if isinstance(exc.body, dict) else None
        # Both SDKs hand over the envelope's `error` object; a body without one is not ours.
        documented = exc.status_code in DOCUMENTED_ERRORS and body is not None
        problem = None if documented else f"{exc.status_code}: {str(exc.body)[:300]}"
        error = body.get("error", body) if body else {}
        code = error.get("code") or error.get("type") if isinstance(error, dict) else None
        return f"{exc.status_code} {code}", problem
    except (openai.APIConnectionError, anthropic.APIConnectionError) as exc:
        if isinstance(exc, (openai.APITimeoutError, anthropic.APITimeoutError)):
            return "timeout", f"no answer within {CALL_DEADLINE_SECONDS}s"
        return "unreachable", None
    except (httpx.RemoteProtocolError, httpx.ReadError):
        # A stream cut when the gateway itself went down (the kill scenarios).
        return "cut", None
    except AssertionError as exc:
        return "bad answer", f"an answer without content or usage: {exc}"
    return "ok", None


# --- what every scenario checks at the end --------------------------------------------------


def records_in_postgres(postgres: OwnPostgres, database: str) -> int:
    row = postgres.execute(database, "SELECT count(*) FROM usage_callrecord")
    return int(row[0])


def records_in_sqlite(root: Path) -> int:
    with contextlib.closing(
        sqlite3.connect(root / "data" / "llmrotate.sqlite3", timeout=30)
    ) as conn:
        return int(conn.execute("SELECT count(*) FROM usage_callrecord").fetchone()[0])


def attempts(upstream: FakeUpstream) -> int:
    """Calls the upstream answered on a model route (not its control endpoints)."""
    return int(upstream.stats()["total"])


def spool_files(root: Path) -> list[Path]:
    return sorted((root / "data" / "spool").glob("calls-*.jsonl"))


def assert_clean_outcomes(outcomes: Outcomes, *, allowed: set[str] | None = None) -> None:
    allowed = {"ok"} | (allowed or set())
    assert not outcomes.undocumented, outcomes.undocumented
    assert set(outcomes.counts) <= allowed, outcomes.counts
    assert outcomes.counts["ok"] > 0, outcomes.counts
    assert outcomes.slowest < CALL_DEADLINE_SECONDS, outcomes.slowest


def assert_keys_idle_and_healthy(gateway: Gateway) -> None:
    """No key is left with a call in flight, and none was cooled down or quarantined by a
    fault that was not the upstream's."""

    def settled() -> list[dict[str, Any]] | None:
        keys = gateway.key_states()
        idle = all(k["in_flight"] == 0 for k in keys)
        healthy = all(k["health"] == "active" and k["available"] for k in keys)
        return keys if idle and healthy else None

    try:
        # A killed process's calls stop counting once it has been silent this long.
        wait_for(settled, timeout=PROCESS_ALIVE_SECONDS + 15)
    except AssertionError:
        raise AssertionError(f"keys not idle and healthy: {gateway.key_states()}") from None


@contextlib.contextmanager
def fake_upstream() -> Iterator[FakeUpstream]:
    upstream = FakeUpstream()
    upstream.start_in_thread()
    try:
        yield upstream
    finally:
        upstream.stop()
