"""No message text is stored: a marker sent in every place a conversation carries text (system
and user messages, tool definitions, tool-call arguments in the history and in the answer, the
answer itself), through both official SDKs, JSON and streamed, with a failover, upstream
errors and an answer without usage (whose texts the estimator reads), must then be found in
what the clients received and nowhere the gateway keeps anything: no table, no log line, no
file of its data directory (the spool included), no Redis key, no export, no dashboard page.
Nor do the upstream keys or the client token show in any of these.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.dashboard.test_no_secrets import PAGES
from tests.e2e.conftest import ROUTE, LiveGateway, wait_for
from tests.e2e.test_anthropic_sdk import CLAUDE, SECRETS, Claude

pytestmark = pytest.mark.timeout(120)

# Lowercase hex after a prefix that occurs nowhere else: found as is in any encoding that
# keeps text readable (JSON, CSV, logs), and case-insensitively.
MARKER = f"qzmark{uuid.uuid4().hex[:12]}"
# Loggers of the test's own SDK clients (they log request options at DEBUG): they run in this
# process but are no part of the gateway.
CLIENT_LOGGERS = ("openai", "anthropic")


def tool_script() -> dict[str, Any]:
    """The upstream answers with text and tool calls, each carrying the marker."""
    return {
        "reply": f"Answer {MARKER} here.",
        "tool_calls": [
            {"name": "lookup", "arguments": {"query": MARKER, "note": f"about {MARKER}"}},
            {"name": "search_docs", "arguments": json.dumps({"q": f"{MARKER} docs"})},
        ],
    }


OPENAI_TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": f"Looks things up for {MARKER}",
            "parameters": {
                "type": "object",
                "properties": {"query": {"type": "string", "description": f"{MARKER} query"}},
            },
        },
    }
    for name in ("lookup", "search_docs")
]
ANTHROPIC_TOOLS: list[Any] = [
    {
        "name": name,
        "description": f"Looks things up for {MARKER}",
        "input_schema": {
            "type": "object",
            "properties": {"query": {"type": "string", "description": f"{MARKER} query"}},
        },
    }
    for name in ("lookup", "search_docs")
]
OPENAI_MESSAGES: list[Any] = [
    {"role": "system", "content": f"You are a test. Secret word: {MARKER}."},
    {"role": "user", "content": f"First question {MARKER}"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "lookup", "arguments": json.dumps({"query": MARKER})},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": f"Result {MARKER}"},
    {"role": "user", "content": [{"type": "text", "text": f"And now {MARKER}?"}]},
]
ANTHROPIC_MESSAGES: list[Any] = [
    {"role": "user", "content": f"First question {MARKER}"},
    {
        "role": "assistant",
        "content": [
            {"type": "text", "text": f"Looking up {MARKER}"},
            {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {"query": MARKER}},
        ],
    },
    {
        "role": "user",
        "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": f"Result {MARKER}"},
            {"type": "text", "text": f"And now {MARKER}?"},
        ],
    },
]


class GatewayLog(logging.Handler):
    """Every record the gateway's handlers would write (root, the usage log, uvicorn's own),
    formatted as they are but before the redacting filter, so nothing is hidden from it."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.split(".")[0] in CLIENT_LOGGERS:
            return
        self.lines.append(self.format(record))

    @contextlib.contextmanager
    def everywhere(self) -> Iterator[GatewayLog]:
        names = ["", "llmrotate.usage", "uvicorn", "uvicorn.error", "uvicorn.access"]
        loggers = [logging.getLogger(name) for name in names]
        levels = [logger.level for logger in loggers]
        quiet = [logging.getLogger(name) for name in CLIENT_LOGGERS]
        quiet_levels = [logger.level for logger in quiet]
        for logger in loggers:
            logger.addHandler(self)
            logger.setLevel(logging.DEBUG)
        for logger in quiet:
            logger.setLevel(logging.WARNING)
        try:
            yield self
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.removeHandler(self)
                logger.setLevel(level)
            for logger, level in zip(quiet, quiet_levels, strict=True):
                logger.setLevel(level)


@pytest.fixture
def gateway_log() -> Iterator[GatewayLog]:
    with GatewayLog().everywhere() as capture:
        yield capture


@pytest.fixture
def monitor_token(live_gateway: LiveGateway) -> str:
    from keys.config_io import config_import

    report = config_import(data={"clients": [{"name": "e2e-monitor", "scopes": ["monitor"]}]})
    return str(report.generated_tokens["e2e-monitor"])


def database_dump() -> dict[str, str]:
    """Table → every row of it, as text. The tables come from the catalogue
    (sqlite_master, or information_schema on Postgres), not from Django's models, so a table
    no model describes is read too."""
    from django.db import connection

    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(
                "SELECT table_schema, table_name FROM information_schema.tables"
                " WHERE table_type = 'BASE TABLE'"
                " AND table_schema NOT IN ('pg_catalog', 'information_schema')"
            )
            tables = [f'"{schema}"."{name}"' for schema, name in cursor.fetchall()]
        else:
            cursor.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            tables = [f'"{name}"' for (name,) in cursor.fetchall()]
        assert len(tables) > 20, f"the catalogue lists too few tables: {tables}"
        out = {}
        for table in tables:
            cursor.execute(f"SELECT * FROM {table}")  # noqa: S608 - names from the catalogue
            columns = [c[0] for c in cursor.description]
            out[f"table {table}"] = "\n".join(
                json.dumps(dict(zip(columns, map(_text, row), strict=True)))
                for row in cursor.fetchall()
            )
    return out


def _text(value: Any) -> str:
    if isinstance(value, memoryview):  # Postgres bytea
        value = value.tobytes()
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return str(value)


def data_files() -> dict[str, str]:
    """Path → text of every file under the data directory (the spool and broker included)."""
    from django.conf import settings

    roots = {Path(settings.DATA_DIR), Path(settings.LLMROTATE_SPOOL_DIR)}
    out = {}
    for root in roots:
        if root.is_dir():
            for path in root.rglob("*"):
                if path.is_file():
                    with contextlib.suppress(OSError):  # a file removed while walking
                        out[str(path)] = path.read_bytes().decode(errors="replace")
    return out


def redis_dump() -> dict[str, str]:
    """Key → value of every key of the gateway's Redis (the scaled leg: key state, the Celery
    broker's queues and results), whatever its type; empty on the embedded leg."""
    import redis
    from django.conf import settings

    if not settings.REDIS_URL:
        return {}
    read = {
        "string": lambda r, k: [r.get(k)],
        "hash": lambda r, k: [*r.hgetall(k).items()],
        "list": lambda r, k: r.lrange(k, 0, -1),
        "set": lambda r, k: [*r.smembers(k)],
        "zset": lambda r, k: r.zrange(k, 0, -1),
        "stream": lambda r, k: r.xrange(k),
    }
    out = {}
    with redis.Redis.from_url(settings.REDIS_URL) as r:
        for key in r.scan_iter(count=1000):
            kind = r.type(key).decode()
            out[f"redis {key.decode(errors='replace')}"] = repr(read[kind](r, key))
    assert out, "Redis holds no key at all: wrong database?"
    return out


def reconfigure(change: Callable[[], None]) -> None:
    """Change the configuration once the recorder has written what it holds: on the embedded
    leg's shared in-memory SQLite a write meeting the flusher's is refused ("table is locked"),
    and is retried until it goes through."""
    from usage.recorder import get_recorder

    assert get_recorder().flush(timeout=10)

    def written() -> bool:
        change()
        return True

    wait_for(written, message="the configuration could not be written")


def settled_request_ids(expected: set[str], timeout: float = 20) -> list[Any]:
    """Every CallRecord, once each expected request has its final row."""
    from usage.models import CallRecord
    from usage.recorder import get_recorder

    def ready() -> list[Any] | None:
        assert get_recorder().flush(timeout=timeout)
        rows = list(CallRecord.objects.all())
        finals = {r.request_id for r in rows if r.final}
        return rows if expected <= finals else None

    return wait_for(ready, timeout=timeout, message=f"final rows of {expected}")


@dataclass
class Sent:
    received: str  # what the clients got back, as text
    request_ids: set[str]
    upstream_saw: str  # the bodies the fake upstream received, as text


def send_everything(live: LiveGateway, claude: Claude) -> Sent:
    """The marker through both SDKs in every shape; returns once every request is recorded."""
    received: list[str] = []  # what the clients got back, as text
    request_ids: set[str] = set()
    oa = live.openai()
    an = claude.client()

    def remember(headers: Any, *parts: Any) -> None:
        request_ids.add(headers["x-llmrotate-request-id"])
        for part in parts:
            received.append(part if isinstance(part, str) else json.dumps(part, default=str))

    def openai_call(*, stream: bool, **extra: Any) -> None:
        raw = oa.chat.completions.with_raw_response.create(
            model=ROUTE, messages=OPENAI_MESSAGES, tools=OPENAI_TOOLS, stream=stream, **extra
        )
        parsed: Any = raw.parse()
        chunks = [c.model_dump() for c in parsed] if stream else parsed.model_dump()
        remember(raw.headers, chunks)

    def anthropic_call(*, stream: bool, **extra: Any) -> None:
        raw = an.messages.with_raw_response.create(
            model=CLAUDE,
            max_tokens=256,
            system=f"You are a test. Secret word: {MARKER}.",
            messages=ANTHROPIC_MESSAGES,
            tools=ANTHROPIC_TOOLS,
            stream=stream,
            **extra,
        )
        parsed: Any = raw.parse()
        events = [e.model_dump() for e in parsed] if stream else parsed.model_dump()
        remember(raw.headers, events)

    def fails(call: Callable[[], Any], status: int) -> None:
        with pytest.raises((openai.APIStatusError, anthropic.APIStatusError)) as caught:
            call()
        error: Any = caught.value
        assert error.status_code == status
        remember(error.response.headers, error.response.text)

    live.upstream.script({"default": tool_script()})
    # OpenAI: JSON, streamed, streamed with the usage chunk.
    openai_call(stream=False)
    openai_call(stream=True)
    openai_call(stream=True, stream_options={"include_usage": True})
    # Anthropic: JSON and streamed.
    anthropic_call(stream=False)
    anthropic_call(stream=True)
    # Answers without usage: the estimator tokenizes the prompt and the answer's text.
    live.upstream.script({"default": {**tool_script(), "usage": False}})
    openai_call(stream=False)
    openai_call(stream=True)
    anthropic_call(stream=False)
    # Counting tokens: passed through, not recorded, but the prompt goes through the gateway.
    counted = an.messages.count_tokens(
        model=CLAUDE,
        system=f"You are a test. Secret word: {MARKER}.",
        messages=ANTHROPIC_MESSAGES,
        tools=ANTHROPIC_TOOLS,
    )
    assert counted.input_tokens > 0

    # Failovers (a 429, a 529 on the preferred key), and upstream errors on every key (500s,
    # which the SDKs get as 502).
    live.upstream.script({"default": tool_script()})
    reconfigure(lambda: live.prefer("key-a"))
    live.script(key_a=[{"fault": "429", "retry_after": 1}])
    openai_call(stream=False)
    reconfigure(lambda: live.configure(strategy="round_robin"))
    live.script(key_a=[{"fault": "500"}], key_b=[{"fault": "500"}])
    fails(lambda: openai_call(stream=True), 502)
    reconfigure(lambda: claude.prefer("claude-a"))
    claude.script(claude_a=[{"fault": "529"}])
    anthropic_call(stream=True)
    claude.script(claude_a=[{"fault": "500"}], claude_b=[{"fault": "500"}])
    fails(lambda: anthropic_call(stream=False), 502)

    sent = Sent(
        received="\n".join(received),
        request_ids=request_ids,
        upstream_saw=json.dumps(live.upstream.stats()["last_request_bodies"]),
    )
    # The marker really went through, both ways: each check below would otherwise prove nothing.
    assert MARKER in sent.received, "the clients never received the marker"
    for piece in (f"Answer {MARKER} here.", json.dumps({"q": f"{MARKER} docs"})):
        assert piece in sent.received or json.dumps(piece) in sent.received
    assert MARKER in sent.upstream_saw, "the upstream never received the marker"
    rows = settled_request_ids(request_ids)
    assert len(request_ids) == 12
    assert len(rows) >= 14  # the failovers and errors made more than one attempt each
    return sent


# A run of base64 long enough to hold the marker: how Celery's transports (kombu's filesystem
# queue, Redis lists) keep a message's body.
BASE64 = re.compile(r"[A-Za-z0-9+/]{24,}={0,2}")


def _decoded(text: str) -> str:
    """`text`, followed by whatever its base64 runs decode to, so encoded bodies are read too."""
    out = [text]
    for run in BASE64.findall(text):
        with contextlib.suppress(ValueError):
            out.append(base64.b64decode(run + "=" * (-len(run) % 4)).decode(errors="replace"))
    return "\n".join(out)


def stored_in(places: dict[str, str]) -> list[str]:
    return [where for where, text in places.items() if MARKER in _decoded(text).lower()]


def secrets_in(places: dict[str, str], live: LiveGateway) -> list[str]:
    """Where an upstream key or the client token shows in full."""
    secrets = [*live.secrets.values(), *SECRETS.values(), live.token]
    return [where for where, text in places.items() if any(s in text for s in secrets)]


def dashboard_pages(request_ids: set[str]) -> dict[str, str]:
    """Every dashboard page and panel, and each request's page, as a signed-in operator sees
    them (rendered in this process, on the database the gateway writes)."""
    from django.contrib.auth.models import User
    from django.test import Client

    from llmrotate_site.dashboard.panels import PANELS

    browser = Client()
    browser.force_login(User.objects.create_superuser("ops", "ops@example.com", "pw"))
    urls = [
        *(f"/dashboard/{page}?window=1d" for page in PAGES),
        *(f"/dashboard/panels/{name}/?window=1d" for name in PANELS),
        *(f"/dashboard/calls/{request_id}/" for request_id in request_ids),
    ]
    out = {}
    for url in urls:
        response = browser.get(url)
        assert response.status_code == 200, url
        out[f"dashboard {url}"] = response.content.decode()
    return out


def test_the_marker_reaches_the_clients_and_is_stored_nowhere(
    live_gateway: LiveGateway,
    claude: Claude,
    monitor_token: str,
    gateway_log: GatewayLog,
    capfd: pytest.CaptureFixture[str],
):
    sent = send_everything(live_gateway, claude)

    places = database_dump()
    # The dump does hold what was recorded (so an empty or broken dump cannot pass).
    dump = "\n".join(places.values())
    assert all(request_id in dump for request_id in sent.request_ids)

    places.update(_exports(live_gateway, monitor_token, sent.request_ids))
    pages = dashboard_pages(sent.request_ids)
    # The pages do show the calls (so a page that renders nothing cannot pass).
    assert all(any(rid in html for html in pages.values()) for rid in sent.request_ids)
    places.update(pages)

    assert gateway_log.lines, "nothing was logged: the capture is not working"
    assert any('"request_id"' in line for line in gateway_log.lines), "no usage line captured"
    places["gateway log"] = "\n".join(gateway_log.lines)
    out, err = capfd.readouterr()
    places["stdout"], places["stderr"] = out, err

    files = data_files()
    assert files, "the data directory holds no file at all: wrong directory?"
    places.update({f"file {path}": text for path, text in files.items()})
    places.update(redis_dump())

    assert not stored_in(places), f"the marker {MARKER} was stored in: {stored_in(places)}"
    # Nor an upstream key or the client token (the log included, read before its redacting
    # filter: no line even asks it to hide one).
    assert not secrets_in(places, live_gateway), f"a secret in: {secrets_in(places, live_gateway)}"


def test_records_spooled_to_disk_hold_no_text(
    live_gateway: LiveGateway, claude: Claude, monkeypatch: pytest.MonkeyPatch
):
    """With a buffer of zero every record goes through a spool file before the database (as
    when the database is away): each file, read as it is written, holds no marker."""
    import usage.recorder
    from usage.recorder import get_recorder

    spooled: dict[str, str] = {}
    write = usage.recorder.spool_write

    def spool_write_kept(*, spool_dir: Path, rows: Any) -> Path:
        path = write(spool_dir=spool_dir, rows=rows)
        spooled[str(path)] = path.read_text()
        return path

    monkeypatch.setattr(usage.recorder, "spool_write", spool_write_kept)
    monkeypatch.setattr(get_recorder(), "_buffer_max", 0)
    sent = send_everything(live_gateway, claude)
    text = "\n".join(spooled.values())
    # Every request went through the spool (and from there into the database).
    assert all(request_id in text for request_id in sent.request_ids)
    assert not stored_in(spooled), f"the marker {MARKER} was spooled in: {stored_in(spooled)}"


def test_the_marker_is_in_no_answer_of_the_v1_usage_api(
    live_gateway: LiveGateway, claude: Claude, monitor_token: str
):
    """LLM Interactive Proxy's paths (/v1/usage/*): each answers, holds the records (but
    stats, an aggregate), and neither the marker nor a secret."""
    sent = send_everything(live_gateway, claude)
    places: dict[str, str] = {}
    headers = {"Authorization": f"Bearer {monitor_token}"}
    with httpx.Client(base_url=live_gateway.base_url, headers=headers, timeout=30) as http:
        for path, params in (
            ("/v1/usage/export", {}),
            ("/v1/usage/recent", {"limit": 1000}),
            ("/v1/usage/stats", {}),
        ):
            r = http.get(path, params=params)
            assert r.status_code == 200, f"{path} answered {r.status_code}: {r.text}"
            if path != "/v1/usage/stats":
                assert all(rid in r.text for rid in sent.request_ids), f"{path} misses records"
            places[path] = r.text
    assert not stored_in(places), f"the marker {MARKER} was stored in: {stored_in(places)}"
    assert not secrets_in(places, live_gateway), "a secret shows in /v1/usage/*"


def _exports(live: LiveGateway, token: str, request_ids: set[str]) -> dict[str, str]:
    """The monitoring API's exports and record lists, each checked to hold the records."""
    out: dict[str, str] = {}
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=live.base_url, headers=headers, timeout=30) as http:
        for fmt in ("csv", "jsonl", "json"):
            r = http.get("/api/usage/export", params={"format": fmt})
            assert r.status_code == 200, r.text
            assert all(rid in r.text for rid in request_ids), f"{fmt} export misses records"
            out[f"/api/usage/export {fmt}"] = r.text
        r = http.get("/api/usage/recent", params={"limit": 1000})
        assert r.status_code == 200, r.text
        assert all(rid in r.text for rid in request_ids), "/api/usage/recent misses records"
        out["/api/usage/recent"] = r.text
        for rid in request_ids:
            r = http.get(f"/api/requests/{rid}")
            assert r.status_code == 200, r.text
            out[f"/api/requests/{rid}"] = r.text
    return out
