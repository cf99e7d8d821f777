"""#9's figures in our own monitoring API: requests next to attempts, the status clients got,
time to last token, tokens/s streamed and not, tool calls, sessions, token reconciliation,
grouping by upstream model, the new filters, and the new per-request fields. Every call is
written through the production write path (records and rollups in one transaction)."""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime, timedelta

import pytest
from django.test import Client

from tests.usage import monitoring
from tests.usage.monitoring import call, write_calls
from usage.models import Outcome, UsageSource

api = monitoring.api
monitor_token = monitoring.monitor_token
now = monitoring.now

pytestmark = pytest.mark.django_db

STATS = "/api/usage/stats?window=24h"


@pytest.fixture
def traffic(now: datetime) -> None:
    """Four client requests: one failed over (openai → anthropic, streamed, two tool calls),
    one plain call (one tool call), one whose client hung up, one answered without any
    attempt. Two sessions; prompts counted as sent and as forwarded."""
    at = now - timedelta(minutes=10)
    write_calls(
        [
            # Request A, attempt 1: rate limited, failed over.
            call(request_id="A", attempt=1, started_at=at, provider="openai",
                 upstream_model="gpt-4o-mini", outcome=Outcome.RATE_LIMITED, status_code=429,
                 latency_ms=40, session_id="s1", turn=3),
            # Request A, attempt 2: answered by Anthropic, streamed, the final row.
            call(request_id="A", attempt=2, started_at=at + timedelta(seconds=1),
                 provider="anthropic", upstream_model="claude-3-5-haiku", stream=True,
                 ttft_ms=200, ttlt_ms=1200, tokens_per_second=50, latency_ms=1200,
                 prompt_tokens=110, completion_tokens=51, usage_source=UsageSource.REPORTED,
                 counted_prompt_tokens=100, forwarded_prompt_tokens=104, tool_calls=2,
                 tool_names=["search", "search"], session_id="s1", turn=3, final=True,
                 client_status=200),
            # Request B: unstreamed, its rate over the whole call.
            call(request_id="B", started_at=at + timedelta(seconds=2), provider="openai",
                 tokens_per_second=40, latency_ms=500, prompt_tokens=50, completion_tokens=20,
                 usage_source=UsageSource.REPORTED, counted_prompt_tokens=50,
                 forwarded_prompt_tokens=50, tool_calls=1, tool_names=["lookup"],
                 session_id="s1", turn=4, final=True, client_status=200),
            # Request C: the client hung up; counted, but the upstream reported nothing.
            call(request_id="C", started_at=at + timedelta(seconds=3), provider="openai",
                 client="cli", outcome=Outcome.CLIENT_DISCONNECTED, status_code=None,
                 counted_prompt_tokens=30, forwarded_prompt_tokens=31, session_id="s2",
                 turn=1, user_agent="curl/8.5", origin="https://app.example",
                 app_title="My App", final=True, client_status=499),
            # Request D: every key benched, no attempt made.
            call(request_id="D", attempt=0, started_at=at + timedelta(seconds=4), provider="",
                 key_id="", upstream_model="", outcome=Outcome.UNAVAILABLE, status_code=None,
                 final=True, client_status=503),
        ]
    )  # fmt: skip


@pytest.mark.usefixtures("traffic")
def test_stats_count_requests_apart_from_attempts(api: Client) -> None:
    body = api.get(STATS).json()
    # Three attempts for A and B, one for C; D made none. Four requests.
    assert (body["calls"], body["requests"]) == (4, 4)


@pytest.mark.usefixtures("traffic")
def test_status_code_counts_are_per_request_what_the_client_got(api: Client) -> None:
    body = api.get(STATS).json()
    # The 429 that failed over is not a status any client got.
    assert body["status_code_counts"] == {"200": 2, "499": 1, "503": 1}


@pytest.mark.usefixtures("traffic")
def test_time_to_last_token_has_stats_like_ttft(api: Client) -> None:
    ttlt = api.get(STATS).json()["ttlt_stats"]
    assert ttlt["count"] == 1
    assert ttlt["min"] == ttlt["max"] == ttlt["avg"] == 1200
    assert ttlt["p50"] == ttlt["p99"] == 1200


@pytest.mark.usefixtures("traffic")
def test_tokens_per_second_are_split_into_streamed_and_whole_call(api: Client) -> None:
    body = api.get(STATS).json()
    streamed = body["streamed_tokens_per_second_stats"]
    unstreamed = body["unstreamed_tokens_per_second_stats"]
    assert (streamed["count"], streamed["avg"]) == (1, 50)
    assert (unstreamed["count"], unstreamed["avg"]) == (1, 40)
    assert body["tokens_per_second_stats"]["count"] == 2


@pytest.mark.usefixtures("traffic")
def test_tool_calls_have_a_total_and_a_breakdown_per_tool(api: Client) -> None:
    body = api.get(STATS).json()
    assert body["tool_calls"] == 3
    assert body["tools"] == [{"name": "search", "calls": 2}, {"name": "lookup", "calls": 1}]


@pytest.mark.usefixtures("traffic")
def test_sessions_give_unique_sessions_turns_and_tokens_per_session(api: Client) -> None:
    sessions = api.get(STATS).json()["sessions"]
    # s1 made two requests (A and B), s2 one: three turns; s1 used 161 + 70 tokens, s2 none.
    assert sessions == {
        "unique_sessions": 2, "total_turns": 3, "requests": 3, "total_tokens": 231,
        "tokens_per_session": 115.5,
    }  # fmt: skip


@pytest.mark.usefixtures("traffic")
def test_session_and_tool_figures_are_null_under_a_filter_their_rollups_lack(
    api: Client,
) -> None:
    body = api.get(f"{STATS}&stream=true").json()
    assert body["sessions"] is None and body["tools"] is None
    assert body["calls"] == 1


@pytest.mark.usefixtures("traffic")
def test_reconciliation_compares_counted_and_reported_prompts(api: Client) -> None:
    figures = api.get(STATS).json()["reconciliation"]
    # Counted: 100 + 50 + 30 as sent, 104 + 50 + 31 as forwarded. Compared only where the
    # upstream reported usage (A and B): 160 reported vs 150 counted.
    assert figures == {
        "counted_prompt_tokens": 180, "forwarded_prompt_tokens": 185,
        "backend_reported_total_tokens": 231, "compared_reported_prompt_tokens": 160,
        "compared_counted_prompt_tokens": 150, "difference_tokens": 10,
        "difference_percent": pytest.approx(100 * 10 / 150),
    }  # fmt: skip


@pytest.mark.usefixtures("traffic")
def test_reconciliation_per_provider_and_upstream_model(api: Client) -> None:
    body = api.get("/api/usage/reconciliation?window=24h").json()
    assert body["by"] == "upstream_model"
    rows = {(m["provider"], m["model"]): m for m in body["models"]}
    assert set(rows) == {("anthropic", "claude-3-5-haiku"), ("openai", "gpt-4o-mini")}
    claude = rows["anthropic", "claude-3-5-haiku"]
    assert (claude["difference_tokens"], claude["difference_percent"]) == (10, 10.0)
    openai = rows["openai", "gpt-4o-mini"]
    assert (openai["counted_prompt_tokens"], openai["difference_percent"]) == (80, 0.0)
    assert body["total"]["difference_tokens"] == 10
    by_route = api.get("/api/usage/reconciliation?window=24h&by=model").json()
    assert {(m["provider"], m["model"]) for m in by_route["models"]} == {
        ("anthropic", "gpt-4o-mini"), ("openai", "gpt-4o-mini"),
    }  # fmt: skip


@pytest.mark.usefixtures("traffic")
def test_models_group_by_the_upstream_model_on_request(api: Client) -> None:
    by_route = api.get("/api/usage/models?window=24h").json()
    assert by_route["by"] == "model"
    assert {(m["provider"], m["model"]) for m in by_route["models"]} == {
        ("", "gpt-4o-mini"), ("anthropic", "gpt-4o-mini"), ("openai", "gpt-4o-mini"),
    }  # fmt: skip
    body = api.get("/api/usage/models?window=24h&by=upstream_model").json()
    assert body["by"] == "upstream_model"
    rows = {(m["provider"], m["model"]): (m["calls"], m["requests"]) for m in body["models"]}
    assert rows == {
        ("", ""): (0, 1), ("anthropic", "claude-3-5-haiku"): (1, 1),
        ("openai", "gpt-4o-mini"): (3, 2),
    }  # fmt: skip


@pytest.mark.usefixtures("traffic")
def test_usage_totals_and_timeseries_count_requests_too(api: Client) -> None:
    total = api.get("/api/usage?window=24h").json()["total"]
    assert (total["calls"], total["requests"]) == (4, 4)
    buckets = api.get("/api/usage/timeseries?window=24h").json()["buckets"]
    assert sum(b["requests"] for b in buckets) == 4
    assert sum(b["calls"] for b in buckets) == 4


@pytest.mark.usefixtures("traffic")
def test_clients_have_their_sessions_and_status_codes(api: Client) -> None:
    clients = {c["client"]: c for c in api.get("/api/usage/clients?window=24h").json()["clients"]}
    assert clients["cli"]["unique_sessions"] == 1
    assert clients["cli"]["status_code_counts"] == {"499": 1}
    assert clients["client-a"]["unique_sessions"] == 1
    assert clients["client-a"]["requests"] == 3


@pytest.mark.parametrize(
    ("query", "calls", "requests"),
    [
        ("http_status=499", 1, 1),
        ("http_status=200", 2, 2),
        # Only final rows carry the client's status: the failed-over attempt is not counted.
        ("http_status=200&provider=openai", 1, 1),
        ("upstream_model=claude-3-5-haiku", 1, 1),
        ("upstream_model=gpt-4o-mini", 3, 2),
    ],
)
@pytest.mark.usefixtures("traffic")
def test_stats_filter_by_client_status_and_upstream_model(
    api: Client, query: str, calls: int, requests: int
) -> None:
    body = api.get(f"{STATS}&{query}").json()
    assert (body["calls"], body["requests"]) == (calls, requests)


@pytest.mark.parametrize("name", ["session_id", "user_agent", "origin"])
@pytest.mark.parametrize(
    "path",
    ["/api/usage", "/api/usage/models", "/api/usage/stats", "/api/usage/clients",
     "/api/usage/timeseries", "/api/usage/reconciliation"],
)  # fmt: skip
def test_analytics_refuse_record_only_filters_by_name(api: Client, path: str, name: str) -> None:
    response = api.get(f"{path}?{name}=x")
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["param"] == name
    assert "/api/usage/recent" in error["message"]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("session_id=s1", ["B", "A", "A"]),
        ("user_agent=curl/8.5", ["C"]),
        ("origin=https://app.example", ["C"]),
        ("http_status=503", ["D"]),
        ("upstream_model=claude-3-5-haiku", ["A"]),
    ],
)
@pytest.mark.usefixtures("traffic")
def test_recent_takes_the_new_filters(api: Client, query: str, expected: list[str]) -> None:
    records = api.get(f"/api/usage/recent?{query}").json()["records"]
    assert [r["request_id"] for r in records] == expected


@pytest.mark.usefixtures("traffic")
def test_recent_records_carry_the_per_request_fields(api: Client) -> None:
    records = api.get("/api/usage/recent?limit=10").json()["records"]
    by_key = {(r["request_id"], r["attempt"]): r for r in records}
    streamed = by_key["A", 2]
    assert {k: streamed[k] for k in (
        "final", "client_status", "tool_calls", "tool_names", "session_id", "turn",
        "upstream_model", "counted_prompt_tokens", "forwarded_prompt_tokens", "ttft_ms",
        "ttlt_ms", "tokens_per_second", "latency_ms", "stream", "outcome",
    )} == {
        "final": True, "client_status": 200, "tool_calls": 2,
        "tool_names": ["search", "search"], "session_id": "s1", "turn": 3,
        "upstream_model": "claude-3-5-haiku", "counted_prompt_tokens": 100,
        "forwarded_prompt_tokens": 104, "ttft_ms": 200, "ttlt_ms": 1200,
        "tokens_per_second": 50, "latency_ms": 1200, "stream": True, "outcome": "success",
    }  # fmt: skip
    assert (by_key["A", 1]["final"], by_key["A", 1]["client_status"]) == (False, None)
    hung_up = by_key["C", 1]
    assert (hung_up["user_agent"], hung_up["origin"], hung_up["app_title"]) == (
        "curl/8.5", "https://app.example", "My App",
    )  # fmt: skip


def _body(response: object) -> str:
    return b"".join(response.streaming_content).decode()  # type: ignore[attr-defined]


@pytest.mark.usefixtures("traffic")
def test_the_export_carries_the_new_fields_with_a_date_filter(api: Client, now: datetime) -> None:
    since = (now - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    rows = list(
        csv.DictReader(io.StringIO(_body(api.get(f"/api/usage/export?format=csv&since={since}"))))
    )
    a2 = next(r for r in rows if (r["request_id"], r["attempt"]) == ("A", "2"))
    assert json.loads(a2["tool_names"]) == ["search", "search"]
    assert (a2["final"], a2["client_status"], a2["session_id"], a2["turn"]) == (
        "True", "200", "s1", "3",
    )  # fmt: skip
    assert float(a2["ttlt_ms"]) == 1200 and float(a2["tokens_per_second"]) == 50
    assert a2["counted_prompt_tokens"] == "100" and a2["forwarded_prompt_tokens"] == "104"
    lines = _body(api.get(f"/api/usage/export?format=jsonl&since={since}&session_id=s2"))
    (record,) = [json.loads(line) for line in lines.splitlines()]
    assert (record["request_id"], record["client_status"], record["tool_names"]) == ("C", 499, [])
    assert (record["user_agent"], record["origin"], record["app_title"]) == (
        "curl/8.5", "https://app.example", "My App",
    )  # fmt: skip
    future = (now + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert _body(api.get(f"/api/usage/export?format=jsonl&since={future}")) == ""


HOSTILE = {
    "user_agent": '=HYPERLINK("http://evil.example")',
    "origin": "+cmd|' /C calc'!A0",
    "app_title": "@SUM(1+1)",
    "session_id": "-1+2",
}
HOSTILE_TOOLS = ["=cmd|' /C calc'!A0", "+x"]


def test_csv_neutralises_the_new_text_columns_and_tool_names(api: Client, now: datetime) -> None:
    write_calls(
        [call(request_id="evil", started_at=now - timedelta(minutes=1), tool_calls=2,
              tool_names=HOSTILE_TOOLS, final=True, client_status=200, **HOSTILE)]
    )  # fmt: skip
    (row,) = csv.DictReader(io.StringIO(_body(api.get("/api/usage/export?format=csv")), newline=""))
    for column, value in HOSTILE.items():
        assert row[column] == "'" + value, column
    # A JSON list in one cell: it starts with "[", never like a formula, whatever the names.
    assert row["tool_names"].startswith("[")
    assert json.loads(row["tool_names"]) == HOSTILE_TOOLS
    (exact,) = [
        json.loads(x) for x in _body(api.get("/api/usage/export?format=jsonl")).splitlines()
    ]
    assert {column: exact[column] for column in HOSTILE} == HOSTILE
    assert exact["tool_names"] == HOSTILE_TOOLS


def _floats_alike(value: str) -> str:
    # Floats print in each side's shortest form (420 on Postgres, 420.0 in Python).
    try:
        return repr(float(value)) if "." in value or value.isdigit() else value
    except ValueError:
        return value


@pytest.mark.scaled
@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
@pytest.mark.usefixtures("traffic")
def test_postgres_copy_writes_the_new_columns_as_the_python_writers_do(
    now: datetime, fmt: str
) -> None:
    from common.timeframes import TimeFrame
    from usage.export import _WRITERS
    from usage.export_postgres import export_copy
    from usage.filters import UsageFilters
    from usage.record_selectors import usage_export_rows

    write_calls(
        [call(request_id="E", started_at=now - timedelta(minutes=1), tool_calls=2,
              tool_names=["naïve \"tool\"", "=x"], final=True, client_status=200, **HOSTILE)]
    )  # fmt: skip
    frame, filters = TimeFrame(), UsageFilters()
    copied = "".join(export_copy(frame=frame, filters=filters, fmt=fmt))
    written = "".join(_WRITERS[fmt](usage_export_rows(frame=frame, filters=filters)))
    if fmt == "csv":
        parse = [list(csv.reader(io.StringIO(text, newline=""))) for text in (copied, written)]
        assert [[_floats_alike(v) for v in row] for row in parse[0]] == [
            [_floats_alike(v) for v in row] for row in parse[1]
        ]
    else:
        assert [json.loads(x) for x in copied.splitlines()] == [
            json.loads(x) for x in written.splitlines()
        ]
