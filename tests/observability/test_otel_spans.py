"""OpenTelemetry spans and metrics with the SDK's in-memory exporters, driven by real requests
through the proxy (a MockTransport upstream): the span tree, names and attributes of a plain
call, a stream and a failover; W3C trace context continued from the client and propagated
upstream; no secret or message text anywhere in a span; the OTel twins of the Prometheus
series."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from django.test import AsyncClient

from tests.observability.conftest import FALLBACK_ROUTE, ROUTE, Otel
from tests.proxy.conftest import (
    SECRETS,
    AnthropicGateway,
    Gateway,
    eventually,
    status,
)

pytestmark = pytest.mark.asyncio

PROMPT = "Please keep the launch code zebra-quartz-1187 between us."
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


async def post(gateway: Gateway, *, route: str = ROUTE, **body: Any) -> Any:
    headers = {**gateway.headers(), **body.pop("headers", {})}
    payload = {"model": route, "messages": [{"role": "user", "content": PROMPT}], **body}
    response = await AsyncClient().post(
        "/v1/chat/completions",
        data=json.dumps(payload),
        content_type="application/json",
        headers=headers,
    )
    if payload.get("stream"):
        response.streamed = b"".join([c async for c in response.streaming_content]).decode()
    return response


def kind(span: Any) -> str:
    return span.kind.name


async def tree(otel: Otel, attempts: int) -> tuple[Any, list[Any]]:
    """The request's server span and its attempt spans (in attempt order), once all ended."""
    await eventually(lambda: len(otel.finished()) >= attempts + 1)
    spans = otel.finished()
    servers = [s for s in spans if kind(s) == "SERVER"]
    children = [s for s in spans if kind(s) == "CLIENT"]
    assert len(servers) == 1, spans
    assert len(children) == attempts, spans
    return servers[0], sorted(children, key=lambda s: s.attributes["llmrotate.attempt"])


def ids(span: Any) -> tuple[str, str]:
    return f"{span.context.trace_id:032x}", f"{span.context.span_id:016x}"


async def test_a_plain_call_gives_one_server_span_and_one_attempt_child(traced_gateway, otel):
    response = await post(traced_gateway)
    assert response.status_code == 200
    server, [attempt] = await tree(otel, attempts=1)

    assert server.name == f"chat {ROUTE}"
    assert server.parent is None
    assert dict(server.attributes) == {
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": ROUTE,
        "gen_ai.response.model": "gpt-4o-mini",
        "gen_ai.usage.input_tokens": 12,
        "gen_ai.usage.output_tokens": 3,
        "http.response.status_code": 200,
        "llmrotate.request_id": response["x-llmrotate-request-id"],
        "llmrotate.client": "app",
        "llmrotate.stream": False,
        "llmrotate.attempts": 1,
        "llmrotate.outcome": "success",
    }
    assert server.status.status_code.name == "UNSET"

    assert attempt.name == "chat gpt-4o-mini"
    assert attempt.parent.span_id == server.context.span_id
    assert attempt.context.trace_id == server.context.trace_id
    assert dict(attempt.attributes) == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-4o-mini",
        "gen_ai.response.model": "gpt-4o-mini",
        "gen_ai.usage.input_tokens": 12,
        "gen_ai.usage.output_tokens": 3,
        "server.address": "upstream.test",
        "server.port": 443,
        "http.response.status_code": 200,
        "llmrotate.provider": "openai",
        "llmrotate.key_id": response["x-llmrotate-key"],
        "llmrotate.attempt": 1,
        "llmrotate.stream": False,
        "llmrotate.outcome": "success",
    }
    assert attempt.status.status_code.name == "UNSET"
    # The request's span contains its attempt's.
    assert server.start_time <= attempt.start_time
    assert attempt.end_time <= server.end_time


async def test_a_stream_ends_its_spans_when_the_stream_ends(traced_gateway, otel):
    response = await post(traced_gateway, stream=True)
    assert response.status_code == 200 and "[DONE]" in response.streamed
    server, [attempt] = await tree(otel, attempts=1)

    assert attempt.attributes["llmrotate.stream"] is True
    assert attempt.attributes["llmrotate.outcome"] == "success"
    assert attempt.attributes["llmrotate.ttft_ms"] > 0
    assert attempt.attributes["gen_ai.response.model"] == "gpt-4o-mini"  # from the first chunk
    # The gateway asks upstream for the usage chunk (and strips it for this client).
    assert attempt.attributes["gen_ai.usage.input_tokens"] == 9
    assert attempt.attributes["gen_ai.usage.output_tokens"] == 3
    assert server.attributes["llmrotate.stream"] is True
    assert server.attributes["llmrotate.outcome"] == "success"
    assert server.attributes["gen_ai.usage.output_tokens"] == 3
    assert attempt.parent.span_id == server.context.span_id
    assert attempt.end_time <= server.end_time


async def test_a_429_then_success_gives_two_attempt_spans_the_first_with_its_failover_reason(
    traced_gateway, otel
):
    traced_gateway.upstream.first(status(429, headers={"retry-after": "20"}))
    response = await post(traced_gateway)
    assert response.status_code == 200
    server, [failed, answered] = await tree(otel, attempts=2)

    assert {failed.parent.span_id, answered.parent.span_id} == {server.context.span_id}
    assert failed.attributes["llmrotate.attempt"] == 1
    assert failed.attributes["llmrotate.outcome"] == "rate_limited"
    assert failed.attributes["llmrotate.failover_reason"] == "rate_limited"
    assert failed.attributes["http.response.status_code"] == 429
    assert failed.attributes["error.type"]
    assert failed.status.status_code.name == "ERROR"
    assert "gen_ai.usage.input_tokens" not in failed.attributes
    # The key went into cooldown while the first attempt's span was the current one.
    [change] = [e for e in failed.events if e.name == "llmrotate.key_state_change"]
    assert dict(change.attributes) == {
        "llmrotate.key_id": failed.attributes["llmrotate.key_id"],
        "llmrotate.key_state.from": "active",
        "llmrotate.key_state.to": "cooldown",
        "llmrotate.key_state.reason": "rate_limited",
    }

    assert answered.attributes["llmrotate.attempt"] == 2
    assert answered.attributes["llmrotate.outcome"] == "success"
    assert "llmrotate.failover_reason" not in answered.attributes
    assert answered.attributes["llmrotate.key_id"] != failed.attributes["llmrotate.key_id"]
    assert answered.status.status_code.name == "UNSET"
    assert server.attributes["llmrotate.attempts"] == 2
    assert server.attributes["llmrotate.outcome"] == "success"
    assert server.status.status_code.name == "UNSET"


async def test_a_failover_to_another_deployment_names_its_provider_and_server(traced_gateway, otel):
    for key in ("k1", "k2"):
        traced_gateway.upstream.then(key, status(500))
    response = await post(traced_gateway, route=FALLBACK_ROUTE)
    assert response.status_code == 200
    server, attempts = await tree(otel, attempts=3)

    assert [a.attributes["llmrotate.outcome"] for a in attempts] == [
        "upstream_error",
        "upstream_error",
        "success",
    ]
    last = attempts[-1]
    assert last.name == "chat llama-3"
    assert last.attributes["gen_ai.provider.name"] == "openai_compatible"
    assert last.attributes["server.address"] == "backup.test"
    assert last.attributes["llmrotate.key_id"] == "backup-1"
    assert server.name == f"chat {FALLBACK_ROUTE}"
    assert server.attributes["llmrotate.attempts"] == 3


async def test_a_request_that_fails_marks_its_server_span_as_an_error(traced_gateway, otel):
    for key in ("k1", "k2"):
        traced_gateway.upstream.then(key, status(500))
    response = await post(traced_gateway)
    assert response.status_code == 502
    server, attempts = await tree(otel, attempts=2)

    assert server.status.status_code.name == "ERROR"
    assert server.attributes["http.response.status_code"] == 502
    assert server.attributes["llmrotate.outcome"] == "upstream_error"
    assert server.attributes["error.type"] == "upstream_error"
    assert all(a.status.status_code.name == "ERROR" for a in attempts)


async def test_the_clients_traceparent_is_continued_and_propagated_upstream(traced_gateway, otel):
    traceparent = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
    response = await post(
        traced_gateway, headers={"traceparent": traceparent, "tracestate": "vendor=abc"}
    )
    assert response.status_code == 200
    server, [attempt] = await tree(otel, attempts=1)

    assert ids(server)[0] == CLIENT_TRACE
    assert f"{server.parent.span_id:016x}" == CLIENT_SPAN
    assert server.parent.is_remote
    [sent] = traced_gateway.upstream.requests
    version, trace_id, parent_id, flags = sent.headers["traceparent"].split("-")
    assert (version, trace_id, flags) == ("00", CLIENT_TRACE, "01")
    assert (trace_id, parent_id) == ids(attempt)
    assert sent.headers["tracestate"] == "vendor=abc"


async def test_without_a_client_traceparent_the_upstream_gets_the_attempts(traced_gateway, otel):
    assert (await post(traced_gateway)).status_code == 200
    server, [attempt] = await tree(otel, attempts=1)

    assert server.parent is None
    [sent] = traced_gateway.upstream.requests
    _, trace_id, parent_id, _ = sent.headers["traceparent"].split("-")
    assert (trace_id, parent_id) == ids(attempt)


def _span_text(span: Any) -> str:
    """Everything a span exports that a secret could hide in."""
    parts = [span.name, str(span.status.description or "")]
    parts += [f"{k}={v}" for k, v in span.attributes.items()]
    for event in span.events:
        parts.append(event.name)
        parts += [f"{k}={v}" for k, v in (event.attributes or {}).items()]
    return "\n".join(parts)


async def test_no_secret_or_message_text_appears_in_any_span(traced_gateway, otel):
    traced_gateway.upstream.first(status(429))
    assert (await post(traced_gateway)).status_code == 200
    response = await post(traced_gateway, stream=True, stream_options={"include_usage": True})
    assert "Hel" in response.streamed
    await eventually(lambda: len(otel.finished()) == 5)

    exported = "\n".join(_span_text(s) for s in otel.finished())
    assert "launch code" in PROMPT and "launch code" not in exported
    forbidden = [
        *SECRETS.values(),
        traced_gateway.token,
        "Bearer",
        "zebra-quartz",
        "Hello there",  # the completion
        "Hello!",  # the streamed completion, put together
        "upstream says",  # the upstream's error message
    ]
    for text in forbidden:
        assert text not in exported, text


async def test_the_usage_log_line_names_the_attempt_span(traced_gateway, otel, flush_records):
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    usage_logger = logging.getLogger("llmrotate.usage")
    handler, level = Keep(), usage_logger.level
    usage_logger.addHandler(handler)
    usage_logger.setLevel(logging.INFO)
    try:
        assert (await post(traced_gateway)).status_code == 200
        _, [attempt] = await tree(otel, attempts=1)
        flush_records()
    finally:
        usage_logger.removeHandler(handler)
        usage_logger.setLevel(level)

    [line] = [json.loads(x) for x in lines]
    assert (line["trace_id"], line["span_id"]) == ids(attempt)


async def test_the_otel_metrics_mirror_the_prometheus_series(traced_gateway, otel, flush_records):
    # Counters are observed from this process's Prometheus values, which earlier tests of the
    # process added to: each is read before and after.
    def counted(name: str) -> dict[frozenset[Any], float]:
        return {frozenset(p.attributes.items()): p.value for p in otel.points(name)}

    flush_records()
    names = ("llmrotate_requests", "llmrotate_attempts", "llmrotate_tokens")
    before = {name: counted(name) for name in names}
    response = await post(traced_gateway)
    assert response.status_code == 200
    flush_records()  # the recorder's thread counts the records

    def moved(name: str) -> list[tuple[dict[str, Any], float]]:
        after = counted(name)
        return [
            (dict(attrs), value - before[name].get(attrs, 0))
            for attrs, value in after.items()
            if value != before[name].get(attrs, 0)
        ]

    [(request, requests)] = moved("llmrotate_requests")
    assert requests == 1
    assert request == {
        "route": ROUTE,
        "client": "app",
        "outcome": "success",
        "status_class": "2xx",
        "stream": "false",
    }
    [(attempt, attempts)] = moved("llmrotate_attempts")
    assert attempts == 1
    assert attempt == {
        "route": ROUTE,
        "provider": "openai",
        "upstream_model": "gpt-4o-mini",
        "key_id": response["x-llmrotate-key"],
        "outcome": "success",
        "status_class": "2xx",
        "stream": "false",
    }
    [duration] = otel.points("llmrotate_request_duration_seconds")
    assert duration.count == 1
    assert list(duration.explicit_bounds)[:3] == [0.001, 0.0025, 0.005]
    tokens = {attrs["type"]: value for attrs, value in moved("llmrotate_tokens")}
    assert tokens == {"prompt": 12, "completion": 3, "cached": 2}


async def test_anthropic_messages_are_traced_the_same_way(
    anthropic_gateway: AnthropicGateway, otel: Otel
):
    response = await AsyncClient().post(
        "/v1/messages",
        data=json.dumps(
            {"model": "claude", "max_tokens": 64, "messages": [{"role": "user", "content": "x"}]}
        ),
        content_type="application/json",
        headers=anthropic_gateway.headers(),
    )
    assert response.status_code == 200
    server, [attempt] = await tree(otel, attempts=1)
    assert server.name == "chat claude"
    assert attempt.name == "chat claude-3-5-haiku-latest"
    assert attempt.attributes["gen_ai.provider.name"] == "anthropic"
    assert attempt.attributes["server.address"] == "anthropic.test"
    assert attempt.attributes["gen_ai.usage.output_tokens"] > 0
    [sent] = anthropic_gateway.upstream.requests
    assert sent.headers["traceparent"].split("-")[1:3] == list(ids(attempt))


@pytest.fixture
def _no_otel() -> Iterator[None]:
    from common import telemetry

    telemetry.reset()
    yield


async def test_without_configure_every_hook_is_a_no_op(_no_otel):
    from common import metrics, telemetry

    assert telemetry.request_start("chat", "m", {}, start_ns=0, attributes={}) is None
    assert telemetry.attempt_start(None, "chat", "m", {}) is None
    assert telemetry.current_trace_ids() is None
    headers: dict[str, str] = {}
    telemetry.inject(None, headers)
    assert headers == {}
    with telemetry.use(None):
        telemetry.key_state_changed("k", "active", "cooldown", "rate_limited")
        telemetry.breaker_changed("https://x.test", "closed", "open")
    assert all(i.otel is None for i in metrics.instruments())


async def test_breaker_and_key_events_go_to_the_current_span_without_credentials(otel):
    from common import telemetry

    span = telemetry.request_start("chat", "m", {}, start_ns=1, attributes={})
    with telemetry.use(span):
        assert telemetry.current_trace_ids() == telemetry.span_ids(span)
        telemetry.breaker_changed("https://user:pw@up.test:8443/v1?key=abc", "closed", "open")
        telemetry.key_state_changed("key-1", "active", "quarantined", "auth_failed")
    assert telemetry.current_trace_ids() is None
    telemetry.request_end(span, {})
    [done] = otel.finished()
    breaker, key = done.events
    assert breaker.name == "llmrotate.breaker_change"
    assert dict(breaker.attributes) == {
        "llmrotate.endpoint": "https://up.test:8443/v1",
        "llmrotate.breaker.from": "closed",
        "llmrotate.breaker.to": "open",
    }
    assert key.name == "llmrotate.key_state_change"
    assert key.attributes["llmrotate.key_state.to"] == "quarantined"


async def test_observable_gauges_registered_before_configure_are_read_by_the_reader(_no_otel):
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from common import telemetry

    name = "llmrotate_test_gauge_before_configure"
    telemetry.register_observable_gauge(
        name, "A test gauge.", lambda: [(3.0, {"provider": "openai"}), (1.0, {"provider": "x"})]
    )
    try:
        reader = InMemoryMetricReader()
        provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
        assert telemetry.configure(meter_provider=provider)
        points = Otel(spans=None, metrics=reader).points(name)
        assert {p.attributes["provider"]: p.value for p in points} == {"openai": 3.0, "x": 1.0}
    finally:
        telemetry._gauges[:] = [g for g in telemetry._gauges if g[0] != name]
        telemetry.shutdown()
        provider.shutdown()
