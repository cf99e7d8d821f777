"""LLM Interactive Proxy's monitoring endpoints under its paths: /v1/usage/stats, /recent and
/export (usage.lip_api), with its field names, its filters, and our 422s and auth."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any, cast

import pytest
from django.db import connection
from django.http import StreamingHttpResponse
from django.test import Client
from django.test.utils import CaptureQueriesContext

from llmrotate_site.api import api as ninja_api
from tests.factories import ProviderFactory
from tests.usage import monitoring
from tests.usage.monitoring import call, write_calls
from usage import lip_selectors
from usage.models import CallRecord, Outcome, UsageSource

api = monitoring.api
monitor_token = monitoring.monitor_token
now = monitoring.now

pytestmark = pytest.mark.django_db

# LIP's own names (src/core/app/routes/usage_models.py, src/core/domain/usage_record.py).
LIP_STATS_FIELDS = {
    "request_count", "response_count", "unique_sessions", "total_turns", "total_prompt_tokens",
    "total_completion_tokens", "total_tokens", "tokens_per_session",
    "completion_tokens_per_second", "total_tokens_per_second", "total_tool_calls",
    "status_code_counts", "filters", "time_window_seconds", "ttft_stats",
    "proxy_processing_stats", "duration_stats",
}  # fmt: skip
TIMING_FIELDS = {"count", "min_ms", "max_ms", "avg_ms", "p50_ms", "p95_ms", "p99_ms"}
# UsageRecord.to_dict in LIP's src/core/domain/usage_record.py, every key.
LIP_RECORD_FIELDS = {
    "id", "timestamp", "session_id", "turn_number", "backend_type", "backend_instance_id",
    "model", "frontend_type", "leg", "verbatim_prompt_tokens", "verbatim_completion_tokens",
    "mutated_prompt_tokens", "mutated_completion_tokens", "total_tokens",
    "backend_reported_usage", "http_status_code", "tool_call_count", "native_tool_call_count",
    "vtc_tool_call_count", "tool_names", "ttft_ms", "stream_tps", "backend_wait_ms",
    "proxy_processing_ms", "total_duration_ms", "user_agent", "app_title", "proxy_user",
}  # fmt: skip


def final(**overrides: Any) -> Any:
    overrides.setdefault("final", True)
    overrides.setdefault("client_status", 200)
    return call(**overrides)


@pytest.fixture
def traffic(now: datetime) -> dict[str, datetime]:
    """Four client requests, five attempts, over two providers of different kinds:

    r-a   openai-main, streamed, 2 tool calls, session s1 turn 1, curl/8   200
    r-b   openai-main, a 429 attempt then a success, session s1 turn 2     200
    r-c   claude-main (anthropic), session s2 turn 1                       502
    r-d   openai-main, the client hung up                                  499
    """
    ProviderFactory(name="openai-main", kind="openai")
    ProviderFactory(name="claude-main", kind="anthropic")
    t0 = now - timedelta(minutes=30)
    reported = {"usage_source": UsageSource.REPORTED}
    write_calls([
        final(request_id="r-a", started_at=t0, stream=True, ttft_ms=100.0, ttlt_ms=300.0,
              latency_ms=400.0, overhead_ms=2.0, prompt_tokens=10, completion_tokens=20,
              total_tokens=30, tool_calls=2, tool_names=["get_weather", "lookup"],
              session_id="s1", turn=1, user_agent="curl/8", counted_prompt_tokens=9,
              forwarded_prompt_tokens=11, **reported),
        call(request_id="r-b", attempt=1, started_at=t0 + timedelta(minutes=5),
             outcome=Outcome.RATE_LIMITED, status_code=429, key_id="openai-1", latency_ms=50.0,
             session_id="s1", turn=2),
        final(request_id="r-b", attempt=2, started_at=t0 + timedelta(minutes=5),
              key_id="openai-2", latency_ms=800.0, overhead_ms=3.0, prompt_tokens=5,
              completion_tokens=5, total_tokens=10, session_id="s1", turn=2,
              usage_source=UsageSource.ESTIMATED),
        final(request_id="r-c", started_at=t0 + timedelta(minutes=10), provider="claude-main",
              upstream_model="claude-sonnet-4", requested_model="claude", key_id="claude-1",
              outcome=Outcome.UPSTREAM_ERROR, status_code=502, client_status=502,
              latency_ms=200.0, session_id="s2", turn=1, user_agent="python-httpx/0.28"),
        final(request_id="r-d", started_at=t0 + timedelta(minutes=15),
              outcome=Outcome.CLIENT_DISCONNECTED, client_status=499, latency_ms=1000.0),
    ])  # fmt: skip
    return {"t0": t0}


def stats(api: Client, **params: Any) -> dict[str, Any]:
    response = api.get("/v1/usage/stats", params)
    assert response.status_code == 200, response.content
    return dict(response.json())


# --- stats ---------------------------------------------------------------------------------


def test_stats_has_every_lip_field_and_counts_requests_and_attempts_apart(
    api: Client, traffic: dict[str, datetime]
) -> None:
    body = stats(api)
    assert set(body) >= LIP_STATS_FIELDS
    assert (body["request_count"], body["attempt_count"], body["response_count"]) == (4, 5, 3)
    assert body["status_code_counts"] == {"200": 2, "499": 1, "502": 1}
    assert (body["unique_sessions"], body["total_turns"]) == (2, 3)
    assert (body["total_prompt_tokens"], body["total_completion_tokens"]) == (15, 25)
    assert (body["total_tokens"], body["backend_reported_total_tokens"]) == (40, 30)
    assert body["tokens_per_session"] == pytest.approx(40 / 2)
    assert (body["counted_prompt_tokens"], body["forwarded_prompt_tokens"]) == (9, 11)
    assert body["reconciled_reported_prompt_tokens"] == 10
    assert body["reconciled_counted_prompt_tokens"] == 9
    assert body["total_tool_calls"] == 2
    priced = sum(r.cost_usd or 0 for r in CallRecord.objects.all())
    assert priced > 0 and body["total_cost"] == pytest.approx(float(priced))
    assert body["filters"] == {}


def test_stats_timings_are_per_request_from_the_rollup_histograms(
    api: Client, traffic: dict[str, datetime]
) -> None:
    body = stats(api)
    for name in ("ttft_stats", "duration_stats", "proxy_processing_stats", "ttlt_stats"):
        assert set(body[name]) == TIMING_FIELDS, name
    duration = body["duration_stats"]
    # The final attempts only (their latency is the whole request's): not the 429's 50 ms.
    assert duration["count"] == 4
    assert (duration["min_ms"], duration["max_ms"]) == (200.0, 1000.0)
    assert duration["avg_ms"] == pytest.approx((400 + 800 + 200 + 1000) / 4)
    assert duration["p50_ms"] == pytest.approx(400, rel=0.1)
    assert duration["p99_ms"] == pytest.approx(1000, rel=0.1)
    assert body["ttft_stats"]["count"] == 1 and body["ttft_stats"]["p50_ms"] == 100.0


def test_stats_without_any_call_are_zeros_and_null_timings(api: Client) -> None:
    body = stats(api)
    assert body["request_count"] == 0 and body["status_code_counts"] == {}
    assert body["ttft_stats"] is None and body["duration_stats"] is None
    assert body["time_window_seconds"] == 0.0 and body["completion_tokens_per_second"] == 0.0


def test_stats_time_window_runs_from_the_first_call_or_start_date(
    api: Client, traffic: dict[str, datetime], now: datetime
) -> None:
    # No start_date: from the first matching call's minute up to now (about 30 minutes).
    assert stats(api)["time_window_seconds"] == pytest.approx(30 * 60, abs=120)
    start, end = now - timedelta(hours=2), now - timedelta(hours=1)
    body = stats(api, start_date=start.isoformat(), end_date=end.isoformat())
    assert body["time_window_seconds"] == pytest.approx(3600, abs=1)
    windowed = stats(api)
    assert windowed["completion_tokens_per_second"] == pytest.approx(
        25 / windowed["time_window_seconds"]
    )


def test_backend_type_matches_a_provider_kind_or_a_provider_name(
    api: Client, traffic: dict[str, datetime]
) -> None:
    assert stats(api, backend_type="openai")["request_count"] == 3
    assert stats(api, backend_type="anthropic")["request_count"] == 1
    assert stats(api, backend_type="claude-main")["request_count"] == 1
    assert stats(api, backend_type="gemini")["request_count"] == 0
    assert stats(api, backend_type="anthropic")["filters"] == {"backend_type": "anthropic"}


def test_model_matches_the_route_or_the_upstream_model(
    api: Client, traffic: dict[str, datetime]
) -> None:
    assert stats(api, model="claude")["request_count"] == 1
    assert stats(api, model="claude-sonnet-4")["request_count"] == 1
    assert stats(api, model="gpt-4o-mini")["request_count"] == 3


def test_http_status_code_selects_the_requests_that_ended_with_it(
    api: Client, traffic: dict[str, datetime]
) -> None:
    body = stats(api, http_status_code=200)
    assert (body["request_count"], body["attempt_count"]) == (2, 2)
    assert body["status_code_counts"] == {"200": 2}
    assert body["filters"] == {"http_status_code": 200}


def test_start_and_end_date_bound_the_requests(api: Client, traffic: dict[str, datetime]) -> None:
    t0 = traffic["t0"]
    body = stats(
        api,
        start_date=(t0 + timedelta(minutes=4)).isoformat(),
        end_date=(t0 + timedelta(minutes=11)).isoformat(),
    )
    assert body["request_count"] == 2  # r-b and r-c
    assert body["status_code_counts"] == {"200": 1, "502": 1}


def test_user_agent_and_session_id_are_answered_from_the_records(
    api: Client, traffic: dict[str, datetime]
) -> None:
    body = stats(api, user_agent="curl/8")
    assert (body["request_count"], body["total_tokens"], body["total_tool_calls"]) == (1, 30, 2)
    assert body["duration_stats"]["p50_ms"] == 400.0
    session = stats(api, session_id="s1")
    assert (session["request_count"], session["attempt_count"]) == (2, 3)
    assert (session["unique_sessions"], session["total_turns"]) == (1, 2)
    assert session["status_code_counts"] == {"200": 2}
    assert session["backend_reported_total_tokens"] == 30
    assert session["filters"] == {"session_id": "s1"}


def test_a_user_agent_matching_too_many_calls_covers_the_newest_and_says_from_when(
    api: Client, traffic: dict[str, datetime], monkeypatch: pytest.MonkeyPatch
) -> None:
    t0 = traffic["t0"]
    write_calls([
        final(request_id=f"r-ua-{i}", started_at=t0 + timedelta(minutes=20 + i),
              user_agent="curl/8", total_tokens=1)
        for i in range(3)
    ])  # fmt: skip
    monkeypatch.setattr(lip_selectors, "RAW_LIMIT", 2)
    body = stats(api, user_agent="curl/8")
    # r-a and the first new call are older than the two newest: left out.
    assert (body["request_count"], body["total_tokens"]) == (2, 2)
    assert body["window_start"] == (t0 + timedelta(minutes=21)).isoformat()
    assert body["time_window_seconds"] > 0
    monkeypatch.setattr(lip_selectors, "RAW_LIMIT", 50)
    everything = stats(api, user_agent="curl/8")
    assert (everything["request_count"], everything["window_start"]) == (4, None)


def test_stats_read_the_rollups_not_the_call_records(
    api: Client, traffic: dict[str, datetime]
) -> None:
    with CaptureQueriesContext(connection) as queries:
        stats(api, backend_type="openai", model="gpt-4o-mini", http_status_code=200)
    records = CallRecord._meta.db_table
    assert not [q["sql"] for q in queries if records in q["sql"]]


# --- recent --------------------------------------------------------------------------------


def test_recent_lists_requests_newest_first_in_lip_record_shape(
    api: Client, traffic: dict[str, datetime]
) -> None:
    body = api.get("/v1/usage/recent").json()
    assert (body["total"], body["limit"], body["offset"]) == (4, 100, 0)
    assert [r["id"] for r in body["records"]] == ["r-d", "r-c", "r-b", "r-a"]
    first = body["records"][-1]
    assert set(first) >= LIP_RECORD_FIELDS
    assert first["backend_type"] == "openai" and first["model"] == "gpt-4o-mini"
    assert (first["tool_call_count"], first["tool_names"]) == (2, ["get_weather", "lookup"])
    assert (first["session_id"], first["turn_number"], first["http_status_code"]) == ("s1", 1, 200)
    assert first["backend_reported_usage"]["total_tokens"] == 30
    assert (first["verbatim_prompt_tokens"], first["mutated_prompt_tokens"]) == (9, 11)
    assert (first["ttft_ms"], first["total_duration_ms"]) == (100.0, 400.0)
    assert first["proxy_user"] == "client-a" and first["user_agent"] == "curl/8"
    failover = body["records"][-2]
    assert (failover["attempts"], failover["backend_reported_usage"]) == (2, None)


def test_recent_pages_with_limit_and_offset_and_filters(
    api: Client, traffic: dict[str, datetime]
) -> None:
    page = api.get("/v1/usage/recent", {"limit": 2, "offset": 1}).json()
    assert [r["id"] for r in page["records"]] == ["r-c", "r-b"]
    assert page["total"] == 4
    s1 = api.get("/v1/usage/recent", {"session_id": "s1"}).json()
    assert ([r["id"] for r in s1["records"]], s1["total"]) == (["r-b", "r-a"], 2)
    anthropic = api.get("/v1/usage/recent", {"backend_type": "anthropic"}).json()
    assert ([r["id"] for r in anthropic["records"]], anthropic["total"]) == (["r-c"], 1)
    model = api.get("/v1/usage/recent", {"model": "claude-sonnet-4"}).json()
    assert [r["id"] for r in model["records"]] == ["r-c"]


def test_proxy_user_is_the_client_token_name_everywhere(
    api: Client, traffic: dict[str, datetime]
) -> None:
    write_calls([final(request_id="r-x", client="batch-job", started_at=traffic["t0"])])
    body = stats(api, proxy_user="batch-job")
    assert (body["request_count"], body["filters"]) == (1, {"proxy_user": "batch-job"})
    assert stats(api, proxy_user="client-a")["request_count"] == 4
    recent = api.get("/v1/usage/recent", {"proxy_user": "batch-job"}).json()
    assert ([r["id"] for r in recent["records"]], recent["total"]) == (["r-x"], 1)
    _, exported = _export(api, proxy_user="batch-job")
    assert [r["id"] for r in exported["records"]] == ["r-x"]


def test_recent_and_export_take_the_filters_of_stats(
    api: Client, traffic: dict[str, datetime]
) -> None:
    t0 = traffic["t0"]
    window = {
        "start_date": (t0 + timedelta(minutes=4)).isoformat(),
        "end_date": (t0 + timedelta(minutes=11)).isoformat(),
    }
    recent = api.get("/v1/usage/recent", window).json()
    assert ([r["id"] for r in recent["records"]], recent["total"]) == (["r-c", "r-b"], 2)
    failed = api.get("/v1/usage/recent", {"http_status_code": 502}).json()
    assert [r["id"] for r in failed["records"]] == ["r-c"]
    by_agent = api.get("/v1/usage/recent", {"user_agent": "curl/8"}).json()
    assert ([r["id"] for r in by_agent["records"]], by_agent["total"]) == (["r-a"], 1)
    _, exported = _export(api, session_id="s1", http_status_code=200)
    assert [r["id"] for r in exported["records"]] == ["r-a", "r-b"]
    _, hung_up = _export(api, http_status_code=499, user_agent="nobody")
    assert hung_up["record_count"] == 0 and hung_up["records"] == []


@pytest.mark.parametrize("limit", [0, 1001])
def test_recent_limit_is_1_to_1000(api: Client, limit: int) -> None:
    response = api.get("/v1/usage/recent", {"limit": limit})
    assert response.status_code == 422
    assert response.json()["error"]["param"] == "limit"


# --- export --------------------------------------------------------------------------------


def _export(api: Client, **params: Any) -> tuple[Any, dict[str, Any]]:
    response = api.get("/v1/usage/export", params)
    assert response.status_code == 200, response.content
    assert response.streaming
    # The test client is WSGI: a sync iterator.
    content = cast(Iterator[bytes], cast(StreamingHttpResponse, response).streaming_content)
    pieces = [p.decode() if isinstance(p, bytes) else str(p) for p in content]
    return pieces, json.loads("".join(pieces))


def test_export_streams_every_request_oldest_first_with_its_count(
    api: Client, traffic: dict[str, datetime]
) -> None:
    pieces, body = _export(api)
    assert len(pieces) >= 2  # the head goes out before any record is read
    assert body["version"] == 1 and body["record_count"] == 4
    assert datetime.fromisoformat(body["exported_at"])
    assert [r["id"] for r in body["records"]] == ["r-a", "r-b", "r-c", "r-d"]
    assert set(body["records"][0]) >= LIP_RECORD_FIELDS


@pytest.mark.scaled
def test_postgres_builds_the_export_records_exactly_as_python_does(
    api: Client, traffic: dict[str, datetime]
) -> None:
    # The export's records are built by Postgres (json_build_object), recent's by lip_record.
    # One more at a whole second: isoformat() leaves the microseconds out then.
    whole = traffic["t0"].replace(microsecond=0) + timedelta(minutes=20)
    write_calls([final(request_id="r-whole", started_at=whole, provider="gone-provider")])
    _, exported = _export(api)
    recent = api.get("/v1/usage/recent").json()["records"]
    for built, expected in zip(exported["records"], reversed(recent), strict=True):
        assert list(built) == list(expected), expected["id"]
        assert built == expected, expected["id"]


def test_export_filters_by_dates_backend_and_model(
    api: Client, traffic: dict[str, datetime]
) -> None:
    t0 = traffic["t0"]
    start, end = (t0 + timedelta(minutes=1)).isoformat(), (t0 + timedelta(minutes=10)).isoformat()
    _, body = _export(api, start_date=start, end_date=end)
    # end_date is inclusive: r-c started exactly at it.
    assert [r["id"] for r in body["records"]] == ["r-b", "r-c"]
    assert body["filters"] == {"start_date": start, "end_date": end}
    _, openai = _export(api, backend_type="openai", model="gpt-4o-mini")
    assert (openai["record_count"], [r["id"] for r in openai["records"]]) == (
        3, ["r-a", "r-b", "r-d"],
    )  # fmt: skip


def as_record(record: Any) -> dict[str, Any]:
    """An exported record: a dict, or on Postgres the JSON text it built (RawJSON)."""
    return dict(json.loads(record)) if isinstance(record, str) else dict(record)


def test_export_reads_the_records_a_chunk_at_a_time(traffic: dict[str, datetime]) -> None:
    plan = lip_selectors.lip_export_plan(
        filters=lip_selectors.lip_filters(), frame=lip_selectors.TimeFrame()
    )
    records = map(as_record, lip_selectors.lip_export_records(plan, chunk_size=2))
    with CaptureQueriesContext(connection) as queries:
        first = next(records)
    table = CallRecord._meta.db_table
    selects = [q["sql"] for q in queries if table in q["sql"]]
    # One query of at most a chunk so far: the rest is not read until it is asked for.
    assert len(selects) == 1 and "LIMIT 2" in selects[0]
    assert first["id"] == "r-a"
    with CaptureQueriesContext(connection) as queries:
        rest = [r["id"] for r in records]
    assert rest == ["r-b", "r-c", "r-d"]
    assert len([q for q in queries if table in q["sql"]]) == 2


def test_export_count_and_records_agree_when_calls_arrive_meanwhile(
    api: Client, traffic: dict[str, datetime], now: datetime
) -> None:
    plan = lip_selectors.lip_export_plan(
        filters=lip_selectors.lip_filters(), frame=lip_selectors.TimeFrame()
    )
    write_calls([final(request_id="late", started_at=now)])
    ids = [as_record(r)["id"] for r in lip_selectors.lip_export_records(plan)]
    assert len(ids) == plan.record_count == 4 and "late" not in ids


# --- refusals and auth ---------------------------------------------------------------------

PATHS = ["/v1/usage/stats", "/v1/usage/recent", "/v1/usage/export"]


@pytest.mark.parametrize("path", PATHS)
def test_an_unknown_parameter_is_a_422_naming_the_accepted_ones(api: Client, path: str) -> None:
    response = api.get(path, {"frontend_type": "openai"})
    assert response.status_code == 422
    error = response.json()["error"]
    assert (error["param"], error["code"]) == ("frontend_type", "unknown_parameter")
    assert "frontend_type" in error["message"] and "model" in error["message"]
    assert "backend_type" in error["message"]


@pytest.mark.parametrize("path", ["/v1/usage/stats", "/v1/usage/export"])
@pytest.mark.parametrize("param", ["start_date", "end_date"])
def test_a_bad_date_is_a_422_naming_iso_8601(api: Client, path: str, param: str) -> None:
    response = api.get(path, {param: "yesterday"})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["param"] == param and "ISO 8601" in error["message"]


def test_start_date_after_end_date_is_a_422(api: Client) -> None:
    response = api.get("/v1/usage/stats", {"start_date": "2025-12-02", "end_date": "2025-12-01"})
    assert response.status_code == 422 and response.json()["error"]["param"] == "start_date"


# --- OpenAPI -------------------------------------------------------------------------------


def test_openapi_documents_the_three_endpoints_with_params_and_bodies() -> None:
    schema = ninja_api.get_openapi_schema()
    # LIP's recent and export take "all filter parameters from /v1/usage/stats".
    filters = {"backend_type", "model", "start_date", "end_date", "http_status_code",
               "user_agent", "session_id", "proxy_user"}  # fmt: skip
    expected = {
        "/v1/usage/stats": filters,
        "/v1/usage/recent": filters | {"limit", "offset"},
        "/v1/usage/export": filters,
    }
    for path, params in expected.items():
        operation = schema["paths"][path]["get"]
        assert {p["name"] for p in operation["parameters"]} == params, path
        assert {"200", "401", "403", "422"} <= {str(c) for c in operation["responses"]}, path
        assert operation["responses"][200]["content"]["application/json"]["schema"]["$ref"]
    components = schema["components"]["schemas"]
    assert set(components["LipStatsOut"]["properties"]) >= LIP_STATS_FIELDS
    assert set(components["LipRecordOut"]["properties"]) >= LIP_RECORD_FIELDS
