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


class TimeseriesQuery(FilterQuery):
    bucket: BucketSize | None = Field(
        None,
        description="Bucket size: 1m, 5m, 15m, 1h, 6h, 1d … (dividing a day, or whole days up "
        f"to {MAX_BUCKET.days}d). Default follows the window: 1h→1m, 24h→15m, 7d→1h, 30d→6h; "
        "a longer frame gets the first of 1d, 7d, 30d, 365d, 3650d that keeps it within 2000 "
        "buckets.",
    )


class RecentQuery(FilterQuery):
    limit: int = Field(50, ge=1, le=1000, description="Records per page (1-1000).")
    cursor: Cursor | None = Field(None, description="next_cursor of the previous page.")


class EventsQuery(FilterQuery):
    limit: int = Field(100, ge=1, le=1000, description="How many recent records (1-1000).")


class ExportQuery(FilterQuery):
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


class StatsOut(Schema):
    calls: int = Field(description="Upstream attempts (each failover step counts).")
    successes: int
    errors: int
    success_rate: float | None = Field(description="successes / calls; null without calls.")
    error_rate: float | None = Field(description="errors / calls; null without calls.")
    errors_by_type: dict[str, int] = Field(description="Error count per outcome.")
    tokens: TokensOut
    cost_usd: float = Field(description="Summed cost in USD (calls with a known price).")
    ttft_stats: MetricStatsOut = Field(description="Time to first token, ms (streams).")
    duration_stats: MetricStatsOut = Field(description="Attempt duration, ms.")
    overhead_stats: MetricStatsOut = Field(description="Time the gateway itself added, ms.")
    tokens_per_second_stats: MetricStatsOut = Field(description="Streaming output speed.")


class UsageStatsOut(FrameOut, StatsOut):
    pass


class ClientStatsOut(StatsOut):
    client: str = Field(description="Client (token) name; empty for unauthenticated calls.")
    token: str | None = Field(description="The client's token, masked; null if unknown.")


class ClientsOut(FrameOut):
    clients: list[ClientStatsOut]


class ProviderUsageOut(Schema):
    provider: str
    calls: int
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
    model: str = Field(description="The requested model (route name).")
    calls: int
    successes: int
    errors: int
    total_tokens: int
    estimated_cost_usd: float


class ModelsOut(FrameOut):
    models: list[ModelUsageOut]


class BucketOut(Schema):
    start: datetime = Field(description="UTC start of the bucket.")
    calls: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost_usd: float


class TimeseriesOut(FrameOut):
    bucket_seconds: int = Field(description="Length of each bucket.")
    buckets: list[BucketOut] = Field(description="Oldest first, empty buckets included.")


class RecordOut(Schema):
    request_id: str = Field(description="The client request; shared by its failover attempts.")
    attempt: int = Field(description="1 for the first upstream attempt, 2 for the next, …")
    started_at: datetime
    finished_at: datetime
    client: str
    requested_model: str
    provider: str
    upstream_model: str
    key_id: str = Field(description="Upstream key id (a name, never the key).")
    stream: bool
    status_code: int | None = Field(description="Upstream HTTP status; null if none came.")
    outcome: str = Field(description="success, rate_limited, timeout, … (see docs/errors.md).")
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
    latency_ms: float
    ttft_ms: float | None
    ttlt_ms: float | None = Field(description="Time to last token, ms (streams).")
    tokens_per_second: float | None
    overhead_ms: float
    cost_usd: float | None


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
