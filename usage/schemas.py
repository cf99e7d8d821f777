"""The monitoring API's contract: query parameters and response bodies, documented field by
field (they become the OpenAPI schema at /api/openapi.json)."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Literal

from ninja import Field, Schema
from pydantic import AfterValidator, WithJsonSchema
from pydantic_core import PydanticCustomError

from common.timeframes import DURATION_PATTERN, EARLIEST, LATEST, MAX_BUCKET, WINDOW_CHOICES

WindowName = Literal["1h", "24h", "7d", "30d"]
ExportFormat = Literal["csv", "jsonl", "json"]

# One definition for the check and for the pattern the schema declares.
_CONTROL_CHARS = r"\x00-\x1f\x7f"
_CONTROL = re.compile(f"[{_CONTROL_CHARS}]")


def _no_control_characters(value: str) -> str:
    # No name holds one, and Postgres refuses a NUL even in a comparison (a 500, not a miss).
    if _CONTROL.search(value):
        raise PydanticCustomError(
            "control_character", "control characters (such as NUL) are not accepted in names."
        )
    return value


# The JSON schema of each parameter declares what is accepted, so that the OpenAPI document is
# a contract (and the fuzz test generates values on both sides of it); the checks themselves
# stay in common.timeframes and here, with messages that say what is accepted.
PlainText = Annotated[
    str,
    AfterValidator(_no_control_characters),
    WithJsonSchema({"type": "string", "pattern": f"^[^{_CONTROL_CHARS}]*$"}),
]
# A date alone (2025-01-31) is midnight UTC: both are documented, so both are declared.
Timestamp = Annotated[
    str,
    WithJsonSchema(
        {"anyOf": [{"type": "string", "format": "date-time"}, {"type": "string", "format": "date"}]}
    ),
]
BucketSize = Annotated[str, WithJsonSchema({"type": "string", "pattern": DURATION_PATTERN})]
Cursor = Annotated[str, WithJsonSchema({"type": "string", "pattern": r"^[A-Za-z0-9_-]+$"})]

_RANGE = f"Between {EARLIEST:%Y-%m-%d} and {LATEST:%Y-%m-%d}."
_SINCE = (
    "Start (inclusive), ISO 8601, e.g. 2025-01-31T12:00:00Z or 2025-01-31. Naive times are "
    f"UTC. {_RANGE}"
)
_UNTIL = f"End (exclusive), ISO 8601. Omitted: up to now. {_RANGE}"


class TimeFrameQuery(Schema):
    window: WindowName | None = Field(
        None, description=f"A window ending now ({WINDOW_CHOICES}). Not with since/until."
    )
    since: Timestamp | None = Field(None, description=_SINCE)
    until: Timestamp | None = Field(None, description=_UNTIL)


class FilterQuery(TimeFrameQuery):
    provider: PlainText | None = Field(None, description="Only calls to this provider.")
    model: PlainText | None = Field(
        None, description="Only calls for this requested model (the route name)."
    )
    key: PlainText | None = Field(None, description="Only calls made with this upstream key id.")
    client: PlainText | None = Field(None, description="Only calls from this client (token name).")
    status: Literal["success", "error"] | None = Field(
        None, description="success: the attempt succeeded; error: any other outcome."
    )
    stream: bool | None = Field(None, description="Only streamed (true) or unstreamed calls.")
    upstream_model: PlainText | None = Field(
        None, description="Only calls for this upstream model (the model actually called)."
    )
    operation: Literal["chat", "responses", "text_completion", "embeddings"] | None = Field(
        None,
        description="Only calls of this kind: chat (chat completions and messages), responses, "
        "text_completion (legacy completions) or embeddings.",
    )
    http_status: int | None = Field(
        None,
        ge=100,
        le=599,
        description="Only client requests that ended with this HTTP status to the client (499: "
        "the client hung up). Selects each request's final row: its other attempts are not "
        "counted.",
    )


_RECORD_ONLY = (
    " Raw records only (recent, events, export): the analytics endpoints refuse it with 422."
)


class RecordFilterQuery(FilterQuery):
    session_id: PlainText | None = Field(
        None,
        description="Only calls of this session (X-Session-Id, metadata.session_id or the "
        "OpenAI `user` field)." + _RECORD_ONLY,
    )
    user_agent: PlainText | None = Field(
        None, description="Only calls whose User-Agent was exactly this (as stored: truncated to "
        "200 characters)." + _RECORD_ONLY,
    )  # fmt: skip
    origin: PlainText | None = Field(
        None, description="Only calls whose Origin header was exactly this (scheme://host[:port])."
        + _RECORD_ONLY,
    )  # fmt: skip


ModelGrouping = Literal["model", "upstream_model"]


class ModelsQuery(FilterQuery):
    by: ModelGrouping = Field(
        "model",
        description="model: per requested model (the route name); upstream_model: per model "
        "actually called upstream.",
    )


class ReconciliationQuery(FilterQuery):
    by: ModelGrouping = Field(
        "upstream_model",
        description="upstream_model: per model actually called (whose tokenizer counts); model: "
        "per requested model (the route name).",
    )


class TimeseriesQuery(FilterQuery):
    bucket: BucketSize | None = Field(
        None,
        description="Bucket size: 1m, 5m, 15m, 1h, 6h, 1d … (dividing a day, or whole days up "
        f"to {MAX_BUCKET.days}d). Default follows the window: 1h→1m, 24h→15m, 7d→1h, 30d→6h; "
        "a longer frame gets the first of 1d, 7d, 30d, 365d, 3650d that keeps it within 2000 "
        "buckets.",
    )


class RecentQuery(RecordFilterQuery):
    limit: int = Field(50, ge=1, le=1000, description="Records per page (1-1000).")
    cursor: Cursor | None = Field(None, description="next_cursor of the previous page.")


class EventsQuery(RecordFilterQuery):
    limit: int = Field(100, ge=1, le=1000, description="How many recent records (1-1000).")


class ExportQuery(RecordFilterQuery):
    format: ExportFormat = Field("csv", description="csv, jsonl (one object per line) or json.")


# --- responses ----------------------------------------------------------------------------


class FrameOut(Schema):
    since: datetime | None = Field(description="Start of the frame (UTC); null: all time.")
    until: datetime | None = Field(description="End of the frame (UTC); null: up to now.")


class TokensOut(Schema):
    prompt: int = Field(description="Prompt (input) tokens, cached ones included.")
    completion: int = Field(description="Completion (output) tokens.")
    total: int = Field(description="Prompt + completion.")
    cached: int = Field(description="Prompt tokens served from the provider's cache.")
    reasoning: int = Field(description="Reasoning tokens (part of completion).")
    reported: int = Field(description="Total tokens of calls whose usage the upstream reported.")
    estimated: int = Field(
        description="Total tokens of calls whose usage was estimated (or extrapolated)."
    )


class MetricStatsOut(Schema):
    count: int = Field(description="Calls that have this figure.")
    min: float | None = Field(description="Exact minimum.")
    avg: float | None = Field(description="Exact mean.")
    max: float | None = Field(description="Exact maximum.")
    p50: float | None = Field(description="Median, from histograms (within 9.05 %).")
    p95: float | None = Field(description="95th percentile, from histograms (within 9.05 %).")
    p99: float | None = Field(description="99th percentile, from histograms (within 9.05 %).")


class ReconciliationOut(Schema):
    counted_prompt_tokens: int = Field(
        description="Prompt tokens as the client sent them, counted here with tiktoken (the "
        "encoding of the upstream model's family), over every call whose prompt was counted."
    )
    forwarded_prompt_tokens: int = Field(
        description="The same calls' prompts as forwarded upstream (after the gateway's own "
        "changes, such as stream_options), counted the same way."
    )
    backend_reported_total_tokens: int = Field(
        description="Total tokens (prompt + completion) of calls whose usage the upstream "
        "reported; estimated usage is not included."
    )
    compared_reported_prompt_tokens: int = Field(
        description="Upstream-reported prompt tokens, over the calls that have both a count "
        "and reported usage."
    )
    compared_counted_prompt_tokens: int = Field(
        description="Counted prompt tokens (as sent by the client), over those same calls."
    )
    difference_tokens: int = Field(
        description="compared_reported_prompt_tokens - compared_counted_prompt_tokens "
        "(positive: the upstream counted more)."
    )
    difference_percent: float | None = Field(
        description="difference_tokens as a percentage of compared_counted_prompt_tokens; null "
        "with nothing to compare."
    )


_CALLS = "Upstream attempts (each failover step counts; a request answered without any attempt "
_CALLS += "counts none)."
_REQUESTS = "Client requests (however many attempts each took; those answered without any "
_REQUESTS += "attempt included)."


class StatsOut(Schema):
    calls: int = Field(description=_CALLS)
    requests: int = Field(description=_REQUESTS)
    successes: int = Field(description="Attempts that succeeded.")
    errors: int = Field(description="Attempts that did not succeed (calls - successes).")
    success_rate: float | None = Field(
        description="successes / calls (per attempt); null without calls."
    )
    error_rate: float | None = Field(
        description="errors / calls (per attempt); null without calls."
    )
    errors_by_type: dict[str, int] = Field(description="Failed attempts per outcome.")
    status_code_counts: dict[str, int] = Field(
        description="Client requests per HTTP status the client got (499: it hung up before "
        "its answer). Counts requests, not attempts: a request that failed over and then "
        "succeeded counts once, under 200."
    )
    tokens: TokensOut
    reconciliation: ReconciliationOut = Field(
        description="Prompt tokens counted by the gateway against those the upstream reported."
    )
    cost_usd: float = Field(description="Summed cost in USD (calls with a known price).")
    tool_calls: int = Field(
        description="Tool calls in the answers, streamed or not, over every attempt."
    )
    ttft_stats: MetricStatsOut = Field(description="Time to first token, ms (streams).")
    ttlt_stats: MetricStatsOut = Field(
        description="Time to last token, ms (streams): from receiving the request to the last "
        "token relayed."
    )
    duration_stats: MetricStatsOut = Field(description="Attempt duration, ms.")
    overhead_stats: MetricStatsOut = Field(description="Time the gateway itself added, ms.")
    tokens_per_second_stats: MetricStatsOut = Field(
        description="Completion tokens per second, streamed and unstreamed calls together (see "
        "the two figures below for each)."
    )
    streamed_tokens_per_second_stats: MetricStatsOut = Field(
        description="Streams: completion tokens after the first over the time from the first "
        "token to the last (generation speed; recorded when that took at least 10 ms)."
    )
    unstreamed_tokens_per_second_stats: MetricStatsOut = Field(
        description="Unstreamed calls: completion tokens over the whole call, from receiving "
        "the request to the answer (as LLM Metrics Proxy reports it; recorded when the call "
        "took at least 10 ms)."
    )


class SessionsOut(Schema):
    unique_sessions: int = Field(description="Distinct session ids with requests in the frame.")
    total_turns: int = Field(
        description="Requests that carried a session id: each is one of its session's turns."
    )
    requests: int = Field(description="Client requests that carried a session id.")
    total_tokens: int = Field(description="Total tokens of those requests.")
    tokens_per_session: float | None = Field(
        description="total_tokens / unique_sessions; null without sessions."
    )


class ToolCountOut(Schema):
    name: str = Field(description="Tool (function) name, as the upstream answered it.")
    calls: int = Field(description="Tool calls naming it.")


_CONVERSATION_NULL = (
    " Hour resolution (a frame's edges widen to the hour); applies the provider, model and "
    "client filters, and is null when any other filter is given (the session and tool rollups "
    "do not carry it)."
)


class UsageStatsOut(FrameOut, StatsOut):
    sessions: SessionsOut | None = Field(
        description="Sessions (requests that carried a session id)." + _CONVERSATION_NULL
    )
    tools: list[ToolCountOut] | None = Field(
        description="Tool calls per tool name, most called first (tool names beyond the first "
        "few of one answer are counted in tool_calls only)." + _CONVERSATION_NULL
    )


class ClientStatsOut(StatsOut):
    client: str = Field(description="Client (token) name; empty for unauthenticated calls.")
    token: str | None = Field(description="The client's token, masked; null if unknown.")
    unique_sessions: int | None = Field(
        description="Distinct sessions of this client." + _CONVERSATION_NULL
    )


class ClientsOut(FrameOut):
    clients: list[ClientStatsOut]


class OperationStatsOut(StatsOut):
    operation: str = Field(
        description="chat (chat completions and messages), responses (the Responses API), "
        "text_completion (legacy completions) or embeddings."
    )


class OperationsOut(FrameOut):
    operations: list[OperationStatsOut]


class ProviderUsageOut(Schema):
    provider: str
    calls: int = Field(description=_CALLS)
    requests: int = Field(description=_REQUESTS)
    successes: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    estimated_cost_usd: float = Field(description="Summed cost in USD.")


class UsageOut(FrameOut):
    providers: list[ProviderUsageOut] = Field(description="One entry per provider.")
    total: ProviderUsageOut = Field(description="All providers together (provider is '*').")


class ModelUsageOut(Schema):
    provider: str
    model: str = Field(
        description="The requested model (route name), or with by=upstream_model the model "
        "called upstream (empty for requests answered without any attempt)."
    )
    calls: int = Field(description=_CALLS)
    requests: int = Field(
        description="Client requests whose final row is this provider and model (a request that "
        "failed over counts where it ended)."
    )
    successes: int
    errors: int
    total_tokens: int
    estimated_cost_usd: float


class ModelsOut(FrameOut):
    by: ModelGrouping = Field(description="What `model` holds: model or upstream_model.")
    models: list[ModelUsageOut]


class ReconciliationModelOut(ReconciliationOut):
    provider: str
    model: str = Field(description="The upstream model, or with by=model the requested model.")


class ReconciliationByModelOut(FrameOut):
    by: ModelGrouping = Field(description="What `model` holds: upstream_model or model.")
    models: list[ReconciliationModelOut] = Field(
        description="Per provider and model, sorted; models with nothing counted or reported "
        "are left out."
    )
    total: ReconciliationOut = Field(description="All of them together.")


class BucketOut(Schema):
    start: datetime = Field(description="UTC start of the bucket.")
    calls: int = Field(description=_CALLS)
    requests: int = Field(description=_REQUESTS)
    errors: int = Field(description="Attempts that did not succeed.")
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost_usd: float


class TimeseriesOut(FrameOut):
    bucket_seconds: int = Field(description="Length of each bucket.")
    buckets: list[BucketOut] = Field(description="Oldest first, empty buckets included.")


class RecordOut(Schema):
    request_id: str = Field(description="The client request; shared by its failover attempts.")
    attempt: int = Field(
        description="1 for the first upstream attempt, 2 for the next, …; 0: the request was "
        "answered without any attempt (outcome unavailable)."
    )
    started_at: datetime = Field(
        description="When the attempt started (UTC); with attempt 0, when the request came in."
    )
    finished_at: datetime = Field(description="When the attempt ended (UTC).")
    client: str = Field(description="Client (token) name; empty for unauthenticated calls.")
    requested_model: str = Field(description="The model the client asked for (route name).")
    provider: str = Field(description="Provider called; empty when no attempt was made.")
    upstream_model: str = Field(
        description="The model actually called upstream; empty when no attempt was made."
    )
    key_id: str = Field(description="Upstream key id (a name, never the key).")
    stream: bool
    operation: str = Field(description="chat, responses, text_completion or embeddings.")
    client_dialect: str = Field(
        description="The wire format the client spoke: openai or anthropic."
    )
    upstream_dialect: str = Field(
        description="The wire format the upstream spoke (differs from client_dialect when a route "
        "failed over across dialects); empty when no upstream was called."
    )
    status_code: int | None = Field(description="Upstream HTTP status; null if none came.")
    outcome: str = Field(description="success, rate_limited, timeout, … (see docs/errors.md).")
    final: bool = Field(
        description="This row ended the request: its answer, or failure, is what the client "
        "got. Exactly one per request."
    )
    client_status: int | None = Field(
        description="On the final row: the HTTP status the client got (499: it hung up); null "
        "on the other attempts."
    )
    error_type: str
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int
    reasoning_tokens: int
    usage_source: str = Field(
        description="reported (by the upstream), estimated (tokenized here), extrapolated "
        "(tokenized on a sample of a long text, scaled to its length) or none."
    )
    usage_flagged: bool = Field(
        description="The reported usage is implausible for the request (over the model's "
        "context window or the request's output limit): left out of the usage totals until "
        "an operator accepts it."
    )
    counted_prompt_tokens: int | None = Field(
        description="The prompt as the client sent it, counted here with tiktoken; null when "
        "not counted."
    )
    forwarded_prompt_tokens: int | None = Field(
        description="The prompt as forwarded upstream, counted the same way."
    )
    latency_ms: float = Field(description="Total response time of the attempt, ms.")
    ttft_ms: float | None = Field(description="Time to first token, ms (streams).")
    ttlt_ms: float | None = Field(description="Time to last token, ms (streams).")
    tokens_per_second: float | None = Field(
        description="Completion tokens per second: for a stream after its first token, for "
        "any other call over the whole call; null when too short to measure."
    )
    overhead_ms: float
    cost_usd: float | None
    tool_calls: int = Field(description="Tool calls in the answer, streamed or not.")
    tool_names: list[str] = Field(description="Their names (the first few).")
    session_id: str = Field(
        description="Session id (X-Session-Id, metadata.session_id or `user`); empty: none."
    )
    turn: int = Field(description="User messages in the request: the conversation's turn.")
    user_agent: str = Field(description="The caller's User-Agent, truncated.")
    origin: str = Field(description="The caller's Origin header, without path or credentials.")
    app_title: str = Field(description="The caller's X-Title (app title) header, truncated.")
    experiment: str = Field(
        description="The replacement rule the request was eligible for; empty: none."
    )
    arm: str = Field(
        description="Its arm: replaced, control, opt_out_header or opt_out_token; empty: none."
    )
    replacement_attempt: bool = Field(
        description="This attempt went to the replacement target (false on a fallback)."
    )
    replacement_start: bool = Field(
        description="This request began its session's replacement (docs/replacement.md)."
    )


class RecentOut(Schema):
    records: list[RecordOut] = Field(description="Newest first.")
    next_cursor: str | None = Field(description="Pass as cursor for the next page; null: end.")


class EventsOut(Schema):
    events: list[RecordOut] = Field(description="Most recent call records, newest last.")


class RequestOut(Schema):
    request_id: str
    attempts: list[RecordOut] = Field(description="Every upstream attempt, in order.")
    path: list[str] = Field(description="The failover path: provider/key → outcome per step.")
    final_outcome: str = Field(description="Outcome of the last attempt.")


# --- limits (GET /api/limits) -------------------------------------------------------------

_USD_UNIT = "Requests, tokens, or for usd US dollars (a JSON number)."


class LimitMeterOut(Schema):
    kind: Literal["requests", "tokens", "usd"] = Field(description="What is counted.")
    period: Literal["minute", "day", "month"] = Field(
        description="The window: the clock minute (UTC), or the day or calendar month in time_zone."
    )
    limit: float = Field(description=f"The most the window admits. {_USD_UNIT}")
    used: float | None = Field(
        description="Counted in the current window, including what requests still running "
        "reserved (settled to what they used when they end). null: the limiter's store "
        "could not be read (store_error)."
    )
    remaining: float | None = Field(description="limit - used, never below 0; null as used.")
    resets_at: datetime = Field(description="When the current window ends (UTC).")


class ConcurrencyOut(Schema):
    limit: int = Field(description="Requests that may run at once.")
    in_flight: int | None = Field(description="Running now; null: the store could not be read.")


class LimitOut(Schema):
    id: int = Field(description="The Limit's id (admin: /admin/keys/limit/<id>/change/).")
    client: str | None = Field(description="The client token's name; null: any client.")
    route: str | None = Field(description="The route's name; null: any route.")
    meters: list[LimitMeterOut] = Field(description="One per limit set on it; none: no rates.")
    concurrency: ConcurrencyOut | None = Field(
        description="Concurrent requests; null: not limited."
    )


class KeyLimitOut(Schema):
    key_id: str = Field(description="The upstream key's id (never its secret).")
    provider: str
    meters: list[LimitMeterOut] = Field(
        description="Its provider's per-minute limits (requests, tokens) as set on the key."
    )


class SpendOut(Schema):
    day: float = Field(description="This day in time_zone, in US dollars.")
    month: float = Field(description="This calendar month in time_zone, in US dollars.")


class BudgetOut(Schema):
    day: float | None = Field(description="US dollars per day; null: no daily budget.")
    month: float | None = Field(description="US dollars per month; null: no monthly budget.")


class ClientSpendOut(Schema):
    client: str = Field(description="The client token's name.")
    spend_usd: SpendOut = Field(
        description="Recorded cost of its finished calls (the rollups, as /api/usage/clients)."
    )
    budget_usd: BudgetOut = Field(
        description="Its own limit's (the one for any route) usd_per_day and usd_per_month."
    )


class LimitsOut(Schema):
    time_zone: str = Field(description="LLMROTATE_LIMITS_TIME_ZONE: where days and months end.")
    limits: list[LimitOut] = Field(
        description="Every configured limit: clients first (by name, then route), then routes."
    )
    keys: list[KeyLimitOut] = Field(
        description="Routable upstream keys with requests or tokens per minute set."
    )
    clients: list[ClientSpendOut] = Field(description="Every client token, by name.")
    store_error: bool = Field(
        description="true: the limiter's store (Redis) could not be read; used, remaining and "
        "in_flight are null."
    )
