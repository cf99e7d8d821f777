"""One row per upstream attempt, and the price overrides used to cost them.

Names (client, provider, key id) are stored as text rather than foreign keys: records outlive
the keys and tokens they mention, and the recorder writes them in bulk without lookups.
"""

from __future__ import annotations

from typing import Literal, get_args

from django.db import models
from django.db.models import Q
from django.utils.translation import gettext_lazy as _

from usage.sketches import REGISTERS as SKETCH_BYTES


class Outcome(models.TextChoices):
    SUCCESS = "success", _("success")
    CLIENT_ERROR = "client_error", _("client error (4xx)")
    RATE_LIMITED = "rate_limited", _("rate limited (429)")
    QUOTA_EXHAUSTED = "quota_exhausted", _("quota exhausted")
    AUTH_FAILED = "auth_failed", _("upstream auth failed")
    UPSTREAM_ERROR = "upstream_error", _("upstream error (5xx)")
    TIMEOUT = "timeout", _("timeout")
    CONNECTION_ERROR = "connection_error", _("connection error")
    BAD_RESPONSE = "bad_response", _("bad upstream response")
    STREAM_ERROR = "stream_error", _("stream failed midway")
    CLIENT_DISCONNECTED = "client_disconnected", _("client disconnected")
    GATEWAY_ERROR = "gateway_error", _("gateway error (a bug: see the log)")
    # A request answered without any upstream attempt (every key benched, every circuit open):
    # its one row has attempt 0, so that requests are counted however they end.
    UNAVAILABLE = "unavailable", _("no key or endpoint available")
    # Refused by the gateway itself before any attempt (attempt 0, no key, no upstream): a
    # client limit or budget of ours, or a bad token, a route the token may not use, a model
    # that does not exist, a body the gateway cannot send.
    RATE_LIMITED_BY_GATEWAY = "rate_limited_by_gateway", _("rate limited by the gateway")
    BUDGET_EXCEEDED = "budget_exceeded", _("budget exceeded")
    REFUSED = "refused", _("refused by the gateway")


class Arm(models.TextChoices):
    """Where a request eligible for a replacement experiment went, and why."""

    REPLACED = "replaced", _("replaced")
    CONTROL = "control", _("not replaced (drawn)")
    OPT_OUT_HEADER = "opt_out_header", _("opted out (header or body field)")
    OPT_OUT_TOKEN = "opt_out_token", _("opted out (client token)")


class UsageSource(models.TextChoices):
    REPORTED = "reported", _("reported by upstream")
    ESTIMATED = "estimated", _("estimated (tiktoken)")
    # Counted on samples of a text too long to tokenize whole, scaled to its full length.
    EXTRAPOLATED = "extrapolated", _("estimated from a sample")
    NONE = "none", _("none")


# The status a client is counted with when it hung up before its answer (nginx's convention).
CLIENT_CLOSED_STATUS = 499


class Operation(models.TextChoices):
    """What kind of call a record is: the endpoint the client called, whatever wire format
    served it. Names follow OpenTelemetry's `gen_ai.operation.name` where it has one."""

    CHAT = "chat", _("chat (chat completions, messages)")
    RESPONSES = "responses", _("responses (OpenAI Responses API)")
    TEXT_COMPLETION = "text_completion", _("text completion (legacy completions)")
    EMBEDDINGS = "embeddings", _("embeddings")


class Dialect(models.TextChoices):
    OPENAI = "openai", "OpenAI"
    ANTHROPIC = "anthropic", "Anthropic"


class CallRecord(models.Model):
    """One upstream attempt (attempt 1, 2, … of a request), or, for a request answered without
    any attempt, one row with attempt 0. Each request has exactly one `final` row: the one
    whose answer, or failure, the client got (`client_status`)."""

    request_id = models.CharField(max_length=40, db_index=True)
    attempt = models.PositiveSmallIntegerField(default=1)
    # Indexed with id (below): the keyset order of /api/usage/recent and the export.
    started_at = models.DateTimeField()
    finished_at = models.DateTimeField()

    client = models.CharField(max_length=100, blank=True, default="")
    requested_model = models.CharField(max_length=200)
    provider = models.CharField(max_length=64, blank=True, default="")
    upstream_model = models.CharField(max_length=200, blank=True, default="")
    key_id = models.CharField(max_length=64, blank=True, default="")
    stream = models.BooleanField(default=False)
    operation = models.CharField(max_length=24, choices=Operation.choices, default=Operation.CHAT)
    # The wire format the client spoke, and the one the upstream spoke: they differ when a
    # route fails over across dialects (a chat completion served by Anthropic's Messages API).
    client_dialect = models.CharField(max_length=16, choices=Dialect.choices, default="openai")
    upstream_dialect = models.CharField(
        max_length=16, choices=Dialect.choices, blank=True, default=""
    )

    status_code = models.PositiveSmallIntegerField(
        _("upstream status"), null=True, blank=True, help_text=_("What the upstream answered.")
    )
    outcome = models.CharField(max_length=32, choices=Outcome.choices)
    final = models.BooleanField(default=False, help_text=_("This row ended the request."))
    client_status = models.PositiveSmallIntegerField(
        null=True, blank=True, help_text=_("On the final row: the HTTP status the client got.")
    )
    error_type = models.CharField(max_length=64, blank=True, default="")

    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    total_tokens = models.PositiveIntegerField(default=0)
    cached_tokens = models.PositiveIntegerField(default=0)
    reasoning_tokens = models.PositiveIntegerField(default=0)
    usage_source = models.CharField(
        max_length=16, choices=UsageSource.choices, default=UsageSource.NONE
    )
    # Reported usage beyond what the request could have used (usage.pricing.usage_implausible):
    # kept with its cost, but left out of the rollups until an operator accepts it (admin).
    usage_flagged = models.BooleanField(default=False)

    # Milliseconds, measured from when the proxy received the request.
    latency_ms = models.FloatField(default=0)
    ttft_ms = models.FloatField(null=True, blank=True)
    ttlt_ms = models.FloatField(_("time to last token (ms)"), null=True, blank=True)
    tokens_per_second = models.FloatField(null=True, blank=True)
    overhead_ms = models.FloatField(_("proxy overhead (ms)"), default=0)

    cost_usd = models.DecimalField(max_digits=18, decimal_places=10, null=True, blank=True)

    # Token reconciliation: the prompt as the gateway counts it (tiktoken; usage/tokens.py says
    # which encoding per model family), as the client sent it and as it went upstream, beside
    # the upstream's own count (prompt_tokens with usage_source=reported).
    counted_prompt_tokens = models.PositiveIntegerField(null=True, blank=True)
    forwarded_prompt_tokens = models.PositiveIntegerField(null=True, blank=True)
    # Tool calls in the answer, streamed or not, and the first few tool names.
    tool_calls = models.PositiveSmallIntegerField(default=0)
    tool_names = models.JSONField(default=list, blank=True)

    # Who called, beyond the client token: a session (X-Session-Id, metadata.session_id or
    # `user`), its turn (user messages in the request), and the caller's own words about
    # itself, truncated and without query strings or credentials.
    session_id = models.CharField(max_length=128, blank=True, default="")
    turn = models.PositiveSmallIntegerField(default=0)
    user_agent = models.CharField(max_length=200, blank=True, default="")
    origin = models.CharField(max_length=200, blank=True, default="")
    app_title = models.CharField(max_length=100, blank=True, default="")
    # The attempt was wire-captured (usage.capture): its exchanges are in a capture file of
    # the hour it ended in, unless pruned since.
    captured = models.BooleanField(default=False)
    # Model replacement experiments (keys.models.ReplacementRule): the rule the request was
    # eligible for, and its arm (Arm); every attempt of a request carries the request's.
    experiment = models.CharField(max_length=64, blank=True, default="")
    arm = models.CharField(max_length=16, blank=True, default="")
    replacement_attempt = models.BooleanField(
        default=False, help_text=_("This attempt went to the replacement target.")
    )
    replacement_start = models.BooleanField(
        default=False, help_text=_("This request began its session's replacement.")
    )

    class Meta:
        ordering = ["-started_at", "-id"]
        indexes = [
            models.Index(fields=["provider", "started_at"], name="call_provider_time"),
            models.Index(fields=["key_id", "started_at"], name="call_key_time"),
            models.Index(fields=["client", "started_at"], name="call_client_time"),
            models.Index(fields=["started_at", "id"], name="call_time_id"),
            models.Index(fields=["requested_model", "started_at"], name="call_model_time"),
            # Filters the monitoring API applies to records rather than rollups (unbounded
            # values): one session's or one caller's rows, in time order.
            models.Index(
                fields=["session_id", "started_at"],
                condition=~Q(session_id=""),
                name="call_session_time",
            ),
            models.Index(fields=["user_agent", "started_at"], name="call_agent_time"),
            # The admin's "flagged" filter: a handful of rows among millions.
            models.Index(
                fields=["started_at", "id"], condition=Q(usage_flagged=True), name="call_flagged"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.request_id}#{self.attempt} {self.outcome}"


class ModelPrice(models.Model):
    """Overrides genai-prices for a model (self-hosted models, negotiated rates, new models)."""

    provider = models.CharField(
        max_length=64, blank=True, default="", help_text=_("Provider name; blank matches any.")
    )
    model = models.CharField(max_length=200, help_text=_("Upstream model name."))
    input_per_mtok = models.DecimalField(
        _("input $ / 1M tokens"), max_digits=12, decimal_places=6, default=0
    )
    cached_input_per_mtok = models.DecimalField(
        _("cached input $ / 1M tokens"), max_digits=12, decimal_places=6, null=True, blank=True
    )
    output_per_mtok = models.DecimalField(
        _("output $ / 1M tokens"), max_digits=12, decimal_places=6, default=0
    )
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["provider", "model"]
        constraints = [
            models.UniqueConstraint(fields=["provider", "model"], name="model_price_unique")
        ]

    def __str__(self) -> str:
        return f"{self.provider or '*'}/{self.model}"


# --- Rollups ------------------------------------------------------------------------------
# One row per (time bucket, dimensions) holding everything the analytics endpoints show, so
# that a 30-day query reads a few thousand rows instead of millions of records. Three tables of
# the same shape at three resolutions, all written in the recorder's transaction: see
# usage/rollups.py for how they are written and usage/selectors.py for how they are read.
#
# Counters, token sums and histogram bins are NULL when zero, not 0: most bins of most rows are
# empty, and Postgres stores a NULL in a bit of the row header rather than 4-8 bytes, which
# keeps the minute table (about one row per four records at 10 million calls a month) close to
# the size of its data.

RollupDimension = Literal[
    "provider",
    "requested_model",
    "upstream_model",
    "key_id",
    "client",
    "stream",
    "ok",
    "client_status",
    "operation",
    "experiment",
    "arm",
]
ROLLUP_DIMENSIONS: tuple[RollupDimension, ...] = get_args(RollupDimension)
OUTCOME_COLUMNS = {outcome.value: f"outcome_{outcome.value}" for outcome in Outcome}
TOKEN_COLUMNS = (
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "reported_tokens",
    "estimated_tokens",
    # Reconciliation: prompts as counted (sent by the client, and as forwarded), and, over the
    # records that have both a count and a reported usage, each side of the comparison.
    "counted_prompt_tokens",
    "forwarded_prompt_tokens",
    "reconciled_reported_tokens",
    "reconciled_counted_tokens",
)
# Counters besides `calls` (attempts): client requests (final rows), and tool calls.
COUNT_COLUMNS = ("requests", "tool_calls")
# Cost in units of 1e-10 USD (CallRecord.cost_usd's precision), so that sums are exact integers
# on every database (SQLite would add decimals as floats).
COST_SCALE = 10


class UsageRollup(models.Model):
    bucket_start = models.DateTimeField(help_text="UTC start of the bucket.")
    provider = models.CharField(max_length=64, blank=True, default="")
    requested_model = models.CharField(max_length=200)
    upstream_model = models.CharField(max_length=200, blank=True, default="")
    key_id = models.CharField(max_length=64, blank=True, default="")
    client = models.CharField(max_length=100, blank=True, default="")
    stream = models.BooleanField(default=False)
    # Success or not: splitting rows by it keeps the `status` filter exact for every figure.
    ok = models.BooleanField()
    # The status the client got, on rows of final attempts (0 on the others): a handful of
    # values, almost all 200, so status_code_counts comes from sums like everything else.
    client_status = models.SmallIntegerField(default=0)
    operation = models.CharField(max_length=24, default=Operation.CHAT)
    experiment = models.CharField(max_length=64, blank=True, default="")
    arm = models.CharField(max_length=16, blank=True, default="")

    calls = models.IntegerField(default=0)
    cost_e10 = models.BigIntegerField("cost (1e-10 USD)", null=True, blank=True)
    # The sum of each record's cost squared (USD²): with the count and the sum, the variance
    # of the cost per request, for the confidence interval of a replacement experiment.
    cost_sq = models.FloatField(null=True, blank=True)
    # Requests whose cost is known (priced, usage not awaiting review) or nil (no tokens used):
    # a cost per request over the others would count them as free.
    priced_requests = models.IntegerField(null=True, blank=True)

    class Meta:
        abstract = True

    def __str__(self) -> str:
        return f"{self.bucket_start:%Y-%m-%d %H:%M} {self.provider}/{self.requested_model}"


def _add_rollup_columns() -> None:
    from usage.histograms import METRICS

    for column in (*OUTCOME_COLUMNS.values(), *COUNT_COLUMNS):
        UsageRollup.add_to_class(column, models.IntegerField(null=True, blank=True))
    for column in TOKEN_COLUMNS:
        UsageRollup.add_to_class(column, models.BigIntegerField(null=True, blank=True))
    for metric in METRICS:
        count = models.IntegerField(null=True, blank=True)
        UsageRollup.add_to_class(f"{metric.prefix}_count", count)
        for stat in ("sum", "min", "max"):
            UsageRollup.add_to_class(
                f"{metric.prefix}_{stat}", models.FloatField(null=True, blank=True)
            )
        for column in metric.bin_columns():
            UsageRollup.add_to_class(column, models.IntegerField(null=True, blank=True))


_add_rollup_columns()


# The unique constraint is the upsert's conflict target, and the index every read uses (bucket
# first, so a time range is one index range).
_BUCKET_DIMS = ["bucket_start", *ROLLUP_DIMENSIONS]
# What /api/usage, /api/usage/models and the time series read. On Postgres a covering index
# holds them with the dimensions, so those reads are index-only scans of narrow index tuples
# instead of visits to the wide rows (a 30-day series read 80 MB of hour rows, now about 10).
# SQLite has no INCLUDE: there it is a plain index on bucket_start.
SUMMARY_COLUMNS = (
    "calls",
    "requests",
    OUTCOME_COLUMNS[Outcome.SUCCESS.value],
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cost_e10",
)


def _summary_index(table: str) -> models.Index:
    return models.Index(
        fields=["bucket_start"],
        include=[*ROLLUP_DIMENSIONS, *SUMMARY_COLUMNS],
        name=f"{table.removeprefix('usage_')}_summary",
    )


class MinuteRollup(UsageRollup):
    class Meta:
        db_table = "usage_rollup_minute"
        constraints = [
            models.UniqueConstraint(fields=_BUCKET_DIMS, name="usage_rollup_minute_bucket_dims")
        ]
        indexes = [_summary_index("usage_rollup_minute")]


class HourRollup(UsageRollup):
    class Meta:
        db_table = "usage_rollup_hour"
        constraints = [
            models.UniqueConstraint(fields=_BUCKET_DIMS, name="usage_rollup_hour_bucket_dims")
        ]
        indexes = [_summary_index("usage_rollup_hour")]


class DayRollup(UsageRollup):
    class Meta:
        db_table = "usage_rollup_day"
        constraints = [
            models.UniqueConstraint(fields=_BUCKET_DIMS, name="usage_rollup_day_bucket_dims")
        ]
        indexes = [_summary_index("usage_rollup_day")]


# --- Rollups of unbounded values ----------------------------------------------------------
# Sessions and tool names have no fixed set of values, so they cannot be dimensions of the
# rollups above (every new value would multiply their rows). Each gets a narrow table of its
# own, per hour, written in the same transaction: rows grow with the sessions (tools) seen per
# hour, and a window's figures are sums and counts over them.


# What identifies a session rollup row (usage.rollups writes rows by it).
SESSION_ROLLUP_KEY = (
    "bucket_seconds",
    "bucket_start",
    "client",
    "provider",
    "requested_model",
    "experiment",
)


class SessionRollup(models.Model):
    """Sessions per hour and per UTC day, per (client, provider, route): how many requests
    carried a session id and their tokens, which add up, and a sketch of the ids, whose
    distinct count merges across rows (usage.sketches). Per hour for the edges of a frame, per
    day for the whole days within it, so a month costs tens of rows per route and client,
    however many sessions it saw."""

    bucket_seconds = models.IntegerField(help_text="3600: an hour; 86400: a UTC day.")
    bucket_start = models.DateTimeField(help_text="UTC start of the hour or day.")
    client = models.CharField(max_length=100, blank=True, default="")
    provider = models.CharField(max_length=64, blank=True, default="")
    requested_model = models.CharField(max_length=200)
    # Set on the rows of requests a replacement rule replaced (their sessions are the rule's
    # replaced sessions); empty on every other.
    experiment = models.CharField(max_length=64, blank=True, default="")
    requests = models.IntegerField(
        default=0, help_text="Requests that carried a session id: each is one of its turns."
    )
    total_tokens = models.BigIntegerField(default=0)
    sketch = models.BinaryField(
        max_length=SKETCH_BYTES,
        help_text="HyperLogLog sketch of the session ids (usage.sketches).",
    )

    class Meta:
        db_table = "usage_rollup_session"
        constraints = [
            models.UniqueConstraint(
                fields=list(SESSION_ROLLUP_KEY),
                name="usage_rollup_session_key",
            )
        ]

    def __str__(self) -> str:
        return f"{self.bucket_start:%Y-%m-%d %H:00} ({self.bucket_seconds} s) {self.client}"


class ReplacementTurnRollup(models.Model):
    """Per hour and replacement rule: at which turn of their session requests were first
    replaced (docs/replacement.md says what "first" is for each kind of rule)."""

    bucket_start = models.DateTimeField(help_text="UTC start of the hour.")
    experiment = models.CharField(max_length=64)
    turn = models.PositiveSmallIntegerField()
    starts = models.IntegerField(default=0)

    class Meta:
        db_table = "usage_rollup_replacement_turn"
        constraints = [
            models.UniqueConstraint(
                fields=["bucket_start", "experiment", "turn"],
                name="usage_rollup_replacement_turn_key",
            )
        ]

    def __str__(self) -> str:
        return f"{self.bucket_start:%Y-%m-%d %H:00} {self.experiment} turn {self.turn}"


class ToolRollup(models.Model):
    bucket_start = models.DateTimeField(help_text="UTC start of the hour.")
    tool_name = models.CharField(max_length=64)
    client = models.CharField(max_length=100, blank=True, default="")
    provider = models.CharField(max_length=64, blank=True, default="")
    requested_model = models.CharField(max_length=200)
    calls = models.IntegerField(default=0)

    class Meta:
        db_table = "usage_rollup_tool"
        constraints = [
            models.UniqueConstraint(
                fields=["bucket_start", "tool_name", "client", "provider", "requested_model"],
                name="usage_rollup_tool_key",
            )
        ]

    def __str__(self) -> str:
        return f"{self.bucket_start:%Y-%m-%d %H:00} {self.tool_name}"
