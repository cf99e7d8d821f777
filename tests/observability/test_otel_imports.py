"""Without the `otel` extra, or without OTEL_* variables, the gateway imports nothing of the
OpenTelemetry SDK: each case is a separate Python process (tests/observability/otel_child.py)
that starts the real ASGI app (lifespan included) and proxies a request through it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_child(mode: str, tmp_path: Path, **otel_env: str) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    # Its own embedded gateway: a fresh SQLite database, in-process key state.
    for name in ("DATABASE_URL", "REDIS_URL", "PROMETHEUS_MULTIPROC_DIR"):
        env.pop(name, None)
    env.update(otel_env, LLMROTATE_DATA_DIR=str(tmp_path), PYTHONPATH=str(REPO))
    done = subprocess.run(
        [sys.executable, "-m", "tests.observability.otel_child", mode],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    assert done.returncode == 0 and lines, f"child failed:\n{done.stdout}\n{done.stderr}"
    result: dict[str, Any] = json.loads(lines[0].removeprefix("RESULT "))
    result["stderr"] = done.stderr
    return result


def sdk_modules(names: list[str]) -> list[str]:
    return [
        m
        for m in names
        if m == "opentelemetry.sdk"
        or m.startswith(("opentelemetry.sdk.", "opentelemetry.exporter"))
    ]


def test_without_the_extra_the_sdk_is_never_imported_and_requests_are_served(tmp_path):
    result = run_child(
        "blocked",
        tmp_path,
        OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9",
        OTEL_TRACES_EXPORTER="otlp",
        OTEL_SERVICE_NAME="llmrotate-test",
    )
    assert result["status"] == 200
    assert result["lifespan"] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    # The variables asked for tracing, so configure did try the SDK, and was refused.
    assert result["refused"], "the gateway never tried to import the SDK: the test proves nothing"
    assert "SDK is not installed" in result["stderr"]
    assert sdk_modules(result["loaded"]) == []
    assert result["upstream_traceparent"] == [None]


def test_with_the_extra_but_no_otel_variables_nothing_of_opentelemetry_is_loaded(tmp_path):
    result = run_child("plain", tmp_path)
    assert result["status"] == 200
    assert result["refused"] == []
    # What was loaded before the gateway started is redis-py's doing (otel_child.py says why);
    # the gateway's startup, request and shutdown add nothing, not even the API.
    added = sorted(set(result["loaded"]) - set(result["loaded_before"]))
    assert added == []
    assert not any(m.startswith("opentelemetry.sdk.trace") for m in result["loaded"])
    assert sdk_modules(result["loaded"]) == sdk_modules(result["loaded_before"])
    assert result["upstream_traceparent"] == [None]


def test_with_the_extra_and_otel_variables_the_gateway_traces(tmp_path):
    """The control for the two tests above: the same child, asked to trace, does."""
    result = run_child(
        "plain",
        tmp_path,
        OTEL_TRACES_EXPORTER="console",
        OTEL_METRICS_EXPORTER="none",
        OTEL_RESOURCE_ATTRIBUTES="deployment.environment=test",
    )
    assert result["status"] == 200
    assert "opentelemetry.sdk.trace" in result["loaded"]
    [traceparent] = result["upstream_traceparent"]
    assert traceparent and traceparent.startswith("00-")
    assert "OpenTelemetry on: service llmrotate, traces to the console" in result["stderr"]


@pytest.mark.parametrize(
    ("env", "asked"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, True),
        ({"OTEL_METRICS_EXPORTER": "console"}, True),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_SERVICE_NAME": "x"}, False),  # a name alone asks for no exporter
    ],
)
def test_only_the_standard_variables_turn_tracing_on(monkeypatch, env, asked):
    from common import telemetry

    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert telemetry._asked_for() is asked
