"""The contract of LLM Interactive Proxy's monitoring endpoints under its own paths
(usage.lip_api): query parameters and response bodies, with LIP's field names and types
(its src/core/app/routes/usage_models.py), plus the figures we add beside them."""

from __future__ import annotations

from typing import Any

from ninja import Field, Schema

from usage.schemas import PlainText, Timestamp

_BACKEND = (
    "Only requests served by this backend: a provider kind (openai, anthropic, "
    "openai_compatible) or a provider name."
)
_MODEL = "Only requests for this model: the route the client asked for, or the upstream model."
LIP_START = (
    "Start (inclusive), ISO 8601, e.g. 2025-12-01T00:00:00Z or 2025-12-01. Naive times are UTC."
)
LIP_END = "End (inclusive), ISO 8601. Omitted: up to now."


class LipFilterQuery(Schema):
    """The filters of LIP's stats, which its recent and export take too."""

    backend_type: PlainText | None = Field(None, description=_BACKEND)
    model: PlainText | None = Field(None, description=_MODEL)
    start_date: Timestamp | None = Field(None, description=LIP_START)
    end_date: Timestamp | None = Field(None, description=LIP_END)
    http_status_code: int | None = Field(
        None, ge=100, le=599, description="Only requests whose client got this HTTP status."
    )
    user_agent: PlainText | None = Field(
        None, description="Only requests with this User-Agent (read from the call records)."
    )
    session_id: PlainText | None = Field(
        None, description="Only requests of this session (read from the call records)."
    )
    proxy_user: PlainText | None = Field(
        None, description="Only requests made with this client token (its name)."
    )


class LipStatsQuery(LipFilterQuery):
    pass


class LipRecentQuery(LipFilterQuery):
    limit: int = Field(100, ge=1, le=1000, description="Records per page (1-1000).")
    offset: int = Field(0, ge=0, le=100_000, description="Records to skip (0-100000).")


class LipExportQuery(LipFilterQuery):
    pass


# --- responses ----------------------------------------------------------------------------


class TimingStatsOut(Schema):
    count: int = Field(description="Requests measured.")
    min_ms: float
    max_ms: float
    avg_ms: float
    p50_ms: float = Field(description="From the rollup histograms: within ±9 %.")
    p95_ms: float
    p99_ms: float


class LipStatsOut(Schema):
    request_count: int = Field(description="Client requests (each counted once).")
    response_count: int = Field(
        description="Requests answered with a status (all but those whose client hung up, 499)."
    )
    attempt_count: int = Field(description="Upstream attempts (failover makes several).")
    unique_sessions: int = Field(description="Distinct session ids.")
    total_turns: int = Field(
        description="Requests that carried a session id: each is one of its session's turns."
    )
    total_prompt_tokens: int
    total_completion_tokens: int
    total_tokens: int = Field(
        description="Tokens of every attempt: reported by the upstream, or counted here."
    )
    backend_reported_total_tokens: int = Field(
        description="The part of total_tokens the upstreams reported; the rest was counted here."
    )
    counted_prompt_tokens: int = Field(description="Prompts as the clients sent them, counted.")
    forwarded_prompt_tokens: int = Field(description="Prompts as forwarded upstream, counted.")
    reconciled_reported_prompt_tokens: int = Field(
        description="Over calls with both a count and a reported usage: reported prompt tokens."
    )
    reconciled_counted_prompt_tokens: int = Field(
        description="Over the same calls: the prompt tokens counted here."
    )
    total_cost: float = Field(description="Estimated cost, USD.")
    tokens_per_session: float
    completion_tokens_per_second: float = Field(
        description="Completion tokens over time_window_seconds (throughput of the window)."
    )
    total_tokens_per_second: float = Field(description="All tokens over time_window_seconds.")
    total_tool_calls: int
    status_code_counts: dict[str, int] = Field(description="HTTP status → requests.")
    filters: dict[str, Any] = Field(description="The filters applied.")
    time_window_seconds: float = Field(
        description="From start_date (or the first matching call) to end_date (or now)."
    )
    window_start: str | None = Field(
        description="Where the figures begin: start_date, or later when a user_agent or "
        "session_id filter matched more than 20,000 attempts (then only the newest are read); "
        "null: from the first call."
    )
    ttft_stats: TimingStatsOut | None = Field(description="Time to first token (streams).")
    proxy_processing_stats: TimingStatsOut | None = Field(description="The gateway's overhead.")
    duration_stats: TimingStatsOut | None = Field(description="Whole request, as the client saw.")
    ttlt_stats: TimingStatsOut | None = Field(description="Time to last token (streams).")


class BackendUsageOut(Schema):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, int]
    completion_tokens_details: dict[str, int]


class LipRecordOut(Schema):
    id: str = Field(description="The request id (x-llmrotate-request-id).")
    timestamp: str = Field(description="When the gateway received the request (ISO 8601).")
    session_id: str | None
    turn_number: int
    backend_type: str | None = Field(description="The provider's kind (or name).")
    backend_instance_id: str | None = Field(
        description="The upstream key's id (a label, never the secret), else the provider."
    )
    model: str = Field(description="The model called upstream (or the route, if none was).")
    frontend_type: str | None = Field(description="Not recorded: always null.")
    leg: str = Field(description="Always PTC: one record per request, as the client got it.")
    verbatim_prompt_tokens: int = Field(description="The prompt as sent, counted (0: not yet).")
    verbatim_completion_tokens: int
    mutated_prompt_tokens: int = Field(description="The prompt as forwarded, counted.")
    mutated_completion_tokens: int
    total_tokens: int
    backend_reported_usage: BackendUsageOut | None
    http_status_code: int | None = Field(description="The status the client got.")
    tool_call_count: int
    native_tool_call_count: int = Field(description="Tool calls in the answer's own fields.")
    vtc_tool_call_count: int = Field(description="Tool calls parsed from text: always 0.")
    tool_names: list[str]
    ttft_ms: float | None
    stream_tps: float | None = Field(
        description="Streams: completion tokens per second after the first token."
    )
    backend_wait_ms: float = Field(description="total_duration_ms less proxy_processing_ms.")
    proxy_processing_ms: float
    total_duration_ms: float
    user_agent: str | None
    app_title: str | None
    proxy_user: str | None = Field(description="The client token's name.")
    provider: str | None
    requested_model: str
    upstream_model: str | None
    attempts: int = Field(description="Upstream attempts made (0: none could be).")
    outcome: str
    stream: bool
    prompt_tokens: int
    completion_tokens: int
    usage_source: str
    ttlt_ms: float | None
    tokens_per_second: float | None
    origin: str | None
    cost_usd: float | None


class LipRecentOut(Schema):
    records: list[LipRecordOut] = Field(description="Requests, newest first.")
    total: int = Field(description="Requests matching the filters.")
    limit: int
    offset: int


class LipExportOut(Schema):
    version: int = Field(description="Always 1.")
    exported_at: str
    record_count: int
    filters: dict[str, Any]
    records: list[LipRecordOut] = Field(description="Requests, oldest first.")
