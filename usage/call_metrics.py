"""The Prometheus (and OpenTelemetry) traffic series, counted from the call records.

Counted where each record is prepared, on the recorder's thread, once per record: the request
path pays nothing for them, and the series agree with the records and the `llmrotate.usage`
line by construction (same tokens, same price). The cost of that is a delay of at most one
flush interval (LLMROTATE_RECORD_FLUSH_SECONDS) before a call shows in /metrics.

Usage the plausibility check flagged is left out of the token and cost series, as it is left
out of the rollups, until someone accepts it.
"""

from __future__ import annotations

from common import metrics
from common.metrics import seconds, status_class
from usage.calls import CallData

_TOKEN_TYPES = (
    ("prompt", "prompt_tokens"),
    ("completion", "completion_tokens"),
    ("cached", "cached_tokens"),
    ("cache_write", "cache_write_tokens"),
    ("reasoning", "reasoning_tokens"),
)


def call_observe(data: CallData) -> None:
    if not metrics.ON:
        return
    route = data.requested_model if data.metric_route is None else data.metric_route
    stream = "true" if data.stream else "false"
    if data.final:
        status = status_class(data.client_status)
        metrics.REQUESTS.inc(route, data.client, data.outcome, status, stream)
        metrics.REQUEST_DURATION.observe(seconds(data.latency_ms), route, stream, status)
    if data.attempt < 1:
        return  # a request that never reached an upstream: no attempt to count
    provider = data.provider
    model = data.upstream_model if data.metric_model is None else data.metric_model
    metrics.ATTEMPTS.inc(
        route, provider, model, data.key_id, data.outcome, status_class(data.status_code), stream
    )
    duration = (data.finished_at - data.started_at).total_seconds()
    metrics.ATTEMPT_DURATION.observe(duration, route, provider, model, stream)
    metrics.OVERHEAD.observe(seconds(data.overhead_ms), route, stream)
    if data.ttft_ms is not None:
        metrics.TTFT.observe(seconds(data.ttft_ms), route, provider, model)
    if data.ttlt_ms is not None:
        metrics.TTLT.observe(seconds(data.ttlt_ms), route, provider, model, stream)
    if data.usage_flagged:
        return
    for kind, name in _TOKEN_TYPES:
        count = getattr(data, name)
        if count:
            metrics.TOKENS.inc(route, provider, model, data.client, kind, amount=count)
    if data.cost_usd:
        metrics.COST.inc(route, provider, model, data.client, amount=float(data.cost_usd))
