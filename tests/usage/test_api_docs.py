"""The interactive reference at /api/docs and the OpenAPI document behind it."""

from __future__ import annotations

import re

import pytest
from django.contrib.staticfiles import finders
from django.test import Client

from common.timeframes import TimeFrameError, parse_bucket
from llmrotate_site.api import api as ninja_api

MONITORING = [
    "/api/health", "/api/keys", "/api/config", "/api/usage", "/api/usage/models",
    "/api/usage/timeseries", "/api/usage/stats", "/api/usage/clients", "/api/usage/recent",
    "/api/events", "/api/requests/{request_id}", "/api/usage/export",
    "/api/usage/reconciliation", "/api/limits",
]  # fmt: skip


@pytest.mark.django_db
def test_the_docs_page_loads_with_assets_served_here_not_from_a_cdn() -> None:
    response = Client().get("/api/docs")
    assert response.status_code == 200
    html = response.content.decode()
    urls = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert any(url.endswith("swagger-ui-bundle.js") for url in urls)
    for url in urls:
        assert url.startswith("/static/"), url
        assert finders.find(url.removeprefix("/static/")), f"{url} is not shipped"
    assert "//cdn" not in html and "https://" not in html
    assert "/api/openapi.json" in html


def test_every_monitoring_operation_documents_its_errors_openai_shaped() -> None:
    schema = ninja_api.get_openapi_schema()
    error = schema["components"]["schemas"]["ErrorDetailOut"]
    assert set(error["properties"]) == {"message", "type", "code", "param"}
    for path in MONITORING:
        operation = schema["paths"][path]["get"]
        responses = {str(code): spec for code, spec in operation["responses"].items()}
        expected = {"401", "403"} | ({"422"} if operation.get("parameters") else set())
        if "{" in path:
            expected.add("404")
        assert expected <= set(responses), path
        for code in expected:
            ref = responses[code]["content"]["application/json"]["schema"]["$ref"]
            assert ref == "#/components/schemas/ErrorOut", (path, code)


def test_parameters_declare_what_is_accepted() -> None:
    parameters = {
        p["name"]: p["schema"]
        for p in ninja_api.get_openapi_schema()["paths"]["/api/usage/recent"]["get"]["parameters"]
    }

    def string(name: str) -> dict[str, object]:
        return next(s for s in parameters[name]["anyOf"] if s.get("type") == "string")

    for name in ("since", "until"):  # a date alone is accepted (and documented) too
        formats = {s.get("format") for s in parameters[name]["anyOf"] if s.get("type") == "string"}
        assert formats == {"date-time", "date"}, name
    assert string("window")["enum"] == ["1h", "24h", "7d", "30d"]
    assert re.fullmatch(str(string("provider")["pattern"]), "openai")
    assert not re.fullmatch(str(string("provider")["pattern"]), "open\x00ai")
    assert (parameters["limit"]["minimum"], parameters["limit"]["maximum"]) == (1, 1000)


@pytest.mark.parametrize("text", ["1m", "15m", "6h", "1d", "3650d"])
def test_a_bucket_the_api_accepts_matches_the_declared_pattern(text: str) -> None:
    assert re.fullmatch(_bucket_pattern(), text)
    parse_bucket(text)


@pytest.mark.parametrize("text", [" 5m", "5m ", "5 m", "5m\n", "0000000005m", "\uff15m", "5s", ""])
def test_a_bucket_off_the_declared_pattern_is_refused(text: str) -> None:
    assert not re.fullmatch(_bucket_pattern(), text)
    with pytest.raises(TimeFrameError):
        parse_bucket(text)


def _bucket_pattern() -> str:
    operation = ninja_api.get_openapi_schema()["paths"]["/api/usage/timeseries"]["get"]
    schema = next(p["schema"] for p in operation["parameters"] if p["name"] == "bucket")
    return str(next(s["pattern"] for s in schema["anyOf"] if s.get("type") == "string"))


# #9's figures, parameters and per-request fields: each says in the schema what it is (and, for
# those that count, whether it counts requests or attempts).
NEW_FIELDS = {
    "UsageStatsOut": [
        "calls", "requests", "status_code_counts", "reconciliation", "tool_calls", "tools",
        "sessions", "ttlt_stats", "tokens_per_second_stats", "streamed_tokens_per_second_stats",
        "unstreamed_tokens_per_second_stats",
    ],
    "ReconciliationOut": [
        "counted_prompt_tokens", "forwarded_prompt_tokens", "backend_reported_total_tokens",
        "compared_reported_prompt_tokens", "compared_counted_prompt_tokens",
        "difference_tokens", "difference_percent",
    ],
    "SessionsOut": [
        "unique_sessions", "total_turns", "requests", "total_tokens", "tokens_per_session",
    ],
    "ClientStatsOut": ["unique_sessions", "requests"],
    "ProviderUsageOut": ["calls", "requests"],
    "ModelUsageOut": ["calls", "requests", "model"],
    "BucketOut": ["calls", "requests"],
    "RecordOut": [
        "final", "client_status", "tool_calls", "tool_names", "session_id", "turn",
        "user_agent", "origin", "app_title", "upstream_model", "counted_prompt_tokens",
        "forwarded_prompt_tokens", "ttft_ms", "ttlt_ms", "tokens_per_second", "latency_ms",
    ],
}  # fmt: skip


@pytest.mark.parametrize("component", sorted(NEW_FIELDS))
def test_every_new_field_is_described(component: str) -> None:
    properties = ninja_api.get_openapi_schema()["components"]["schemas"][component]["properties"]
    undescribed = [f for f in NEW_FIELDS[component] if not properties[f].get("description")]
    assert not undescribed, undescribed


def test_every_count_says_whether_it_counts_requests_or_attempts() -> None:
    schemas = ninja_api.get_openapi_schema()["components"]["schemas"]
    for component in ("UsageStatsOut", "ProviderUsageOut", "ModelUsageOut", "BucketOut"):
        properties = schemas[component]["properties"]
        assert "attempt" in properties["calls"]["description"].lower(), component
        assert "request" in properties["requests"]["description"].lower(), component


@pytest.mark.parametrize(
    ("path", "names"),
    [
        ("/api/usage/stats", {"upstream_model", "http_status"}),
        ("/api/usage/recent", {"upstream_model", "http_status", "session_id", "user_agent",
                               "origin"}),
        ("/api/usage/export", {"session_id", "user_agent", "origin"}),
        ("/api/usage/models", {"by"}),
        ("/api/usage/reconciliation", {"by", "upstream_model"}),
    ],
)  # fmt: skip
def test_the_new_parameters_are_documented(path: str, names: set[str]) -> None:
    parameters = {
        p["name"]: p for p in ninja_api.get_openapi_schema()["paths"][path]["get"]["parameters"]
    }
    for name in names:
        assert parameters[name]["schema"].get("description") or parameters[name].get(
            "description"
        ), name
