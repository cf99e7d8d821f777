"""One upstream attempt as the recorder receives it (CallData), what happens to it before it
is written (token estimate, price, plausibility, the JSON log line: `call_prepare`), and the
write itself (`calls_write`: records and rollups in one transaction).

usage.recorder runs these on its threads; the seeding command and spool replay use them too, so
every record is prepared and written the same way whatever its path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from datetime import datetime
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import transaction

from keys.limits import Reservation, Settlement, limits_settle, usd_units
from usage.models import CallRecord, UsageSource
from usage.pricing import call_cost, usage_implausible
from usage.rollups import rollups_upsert
from usage.spool import Row, row_fit_to_columns, row_to_json
from usage.tokens import (
    PROMPT_FIELDS,
    count_prompt_tokens,
    estimate_prompt_tokens,
    estimate_text_tokens,
)

logger = logging.getLogger(__name__)
usage_logger = logging.getLogger("llmrotate.usage")


@dataclass(slots=True)
class CallData:
    """One upstream attempt, as the proxy saw it. Field names are CallRecord's."""

    request_id: str
    started_at: datetime
    finished_at: datetime
    requested_model: str
    outcome: str
    attempt: int = 1
    client: str = ""
    provider: str = ""
    upstream_model: str = ""
    key_id: str = ""
    stream: bool = False
    operation: str = "chat"
    client_dialect: str = "openai"
    upstream_dialect: str = ""
    status_code: int | None = None
    error_type: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    usage_source: str = UsageSource.NONE
    usage_flagged: bool = False
    latency_ms: float = 0.0
    ttft_ms: float | None = None
    ttlt_ms: float | None = None
    tokens_per_second: float | None = None
    overhead_ms: float = 0.0
    cost_usd: Decimal | None = None
    final: bool = False
    client_status: int | None = None
    counted_prompt_tokens: int | None = None
    forwarded_prompt_tokens: int | None = None
    tool_calls: int = 0
    tool_names: list[str] = field(default_factory=list)
    session_id: str = ""
    turn: int = 0
    user_agent: str = ""
    origin: str = ""
    app_title: str = ""
    captured: bool = False
    experiment: str = ""
    arm: str = ""
    replacement_attempt: bool = False
    replacement_start: bool = False
    # Never persisted. provider_kind (openai | anthropic | openai_compatible) picks the price
    # list; cache_write_tokens (Anthropic's cache_creation_input_tokens, part of prompt_tokens)
    # are priced above plain input; estimate is (prompt text, completion text), set only when
    # the upstream reported no usage, tokenized by the recorder and then discarded: text is
    # never stored or logged. estimate_chars is the full length in characters of (prompt,
    # completion) when the proxy kept only part of those texts (None: they are whole), so the
    # estimate scales to it. max_output_tokens is the client's output limit (max_tokens,
    # max_completion_tokens), against which reported usage is checked. prompt_body and
    # forwarded_body are the request as the client sent it and as it went upstream, for the
    # reconciliation counts (`call_count_tokens`), dropped once counted: text is never stored.
    provider_kind: str = ""
    cache_write_tokens: int = 0
    estimate: tuple[str, str] | None = None
    estimate_chars: tuple[int, int] | None = None
    max_output_tokens: int | None = None
    prompt_body: dict[str, Any] | None = None
    forwarded_body: dict[str, Any] | None = None
    # Never persisted either: the attempt's trace and span (hex) when tracing is on, added to
    # the usage log line only, so a log line leads to its trace.
    trace_id: str = ""
    span_id: str = ""
    # Never persisted: what the request, and this attempt's key, reserved against their limits
    # (keys.limits.Reservation), settled from this record once it is priced.
    limits: Reservation | None = None
    key_limits: Reservation | None = None
    # Never persisted: the route and model as the Prometheus series label them, when they are
    # not requested_model and upstream_model. Labels must stay bounded by the configuration,
    # and a pattern route's names (or a refused request's) are whatever the client sent: the
    # series take the pattern (`ollama/*`, `*`) instead, or "-" for a request never routed.
    metric_route: str | None = None
    metric_model: str | None = None

    @property
    def needs_counting(self) -> bool:
        """Whether tokenizing work is due (the recorder's estimator thread does it)."""
        return self.estimate is not None or self.prompt_body is not None

    def __repr__(self) -> str:
        # The dataclass repr would include the estimate's prompt text.
        return f"CallData({self.request_id}#{self.attempt} {self.outcome})"


_NOT_PERSISTED = frozenset(
    {
        "provider_kind",
        "cache_write_tokens",
        "estimate",
        "estimate_chars",
        "max_output_tokens",
        "prompt_body",
        "forwarded_body",
        "trace_id",
        "span_id",
        "limits",
        "key_limits",
        "metric_route",
        "metric_model",
    }
)
PERSISTED_FIELDS: tuple[str, ...] = tuple(
    f.name for f in fields(CallData) if f.name not in _NOT_PERSISTED
)


def calls_write(
    records: list[CallRecord], *, insert: Callable[[list[CallRecord]], None] | None = None
) -> None:
    """Write one batch in one transaction: the records and their rollups commit (or fail and
    are retried) together. The recorder, spool replay (see usage/spool.py) and the seeding
    command (with a faster `insert`: COPY) all write through here."""
    with transaction.atomic():
        if insert is None:
            CallRecord.objects.bulk_create(records)
        else:
            insert(records)
        rollups_upsert(records=records)


def call_count_tokens(data: CallData) -> None:
    """The tokenizing work of one record, then its texts dropped: the reconciliation counts of
    its prompt (as sent and as forwarded), and an estimate of the counts the upstream did not
    report. Each text is tokenized up to LLMROTATE_ESTIMATE_MAX_CHARS characters."""
    _count_prompts(data)
    _estimate(data)


def _same_prompt(sent: dict[str, Any], forwarded: dict[str, Any]) -> bool:
    """Whether the forwarded body carries the very prompt objects the client sent. Dialects
    copy the body shallowly to change a model or add `stream_options`, so the prompt is not
    counted twice (a long prompt costs milliseconds: bench/token_counting.py)."""
    return all(forwarded.get(k) is sent.get(k) for k in PROMPT_FIELDS)


def _count_prompts(data: CallData) -> None:
    sent, forwarded = data.prompt_body, data.forwarded_body
    data.prompt_body = data.forwarded_body = None
    if sent is None:
        return
    model = data.upstream_model or data.requested_model
    max_chars = settings.LLMROTATE_ESTIMATE_MAX_CHARS
    try:
        data.counted_prompt_tokens = count_prompt_tokens(sent, model=model, max_chars=max_chars)
        data.forwarded_prompt_tokens = (
            data.counted_prompt_tokens
            if forwarded is None or _same_prompt(sent, forwarded)
            else count_prompt_tokens(forwarded, model=model, max_chars=max_chars)
        )
    except Exception:
        logger.warning("token count failed for %s", data.request_id, exc_info=True)


def _estimate(data: CallData) -> None:
    """Fill the token counts the upstream did not report from `data.estimate`."""
    if data.estimate is None:
        return
    prompt_text, completion_text = data.estimate
    prompt_chars, completion_chars = data.estimate_chars or (0, 0)
    data.estimate = data.estimate_chars = None  # drop the text as early as possible
    max_chars = settings.LLMROTATE_ESTIMATE_MAX_CHARS
    try:
        sampled = False
        if not data.prompt_tokens:
            prompt = estimate_prompt_tokens(prompt_text, length=prompt_chars, max_chars=max_chars)
            data.prompt_tokens, sampled = prompt.tokens, prompt.sampled
        if not data.completion_tokens:
            completion = estimate_text_tokens(
                completion_text, length=completion_chars, max_chars=max_chars
            )
            data.completion_tokens = completion.tokens
            sampled = sampled or completion.sampled
        data.total_tokens = data.prompt_tokens + data.completion_tokens
        data.usage_source = UsageSource.EXTRAPOLATED if sampled else UsageSource.ESTIMATED
    except Exception:
        logger.warning("token estimate failed for %s", data.request_id, exc_info=True)


def call_prepare(data: CallData, *, log: bool = True) -> Row:
    """Fill estimates and cost, flag implausible usage, log the JSON line (once per record,
    before any write), and return the row to insert. The seeding command uses it too, so
    seeded data is priced the way real traffic is."""
    call_count_tokens(data)  # normally done already, on the estimator thread
    if not data.total_tokens:
        data.total_tokens = data.prompt_tokens + data.completion_tokens
    if data.cost_usd is None and (data.prompt_tokens or data.completion_tokens):
        try:
            data.cost_usd = call_cost(
                provider=data.provider,
                provider_kind=data.provider_kind,
                model=data.upstream_model or data.requested_model,
                prompt_tokens=data.prompt_tokens,
                completion_tokens=data.completion_tokens,
                cached_tokens=data.cached_tokens,
                cache_write_tokens=data.cache_write_tokens,
            )
        except Exception:
            logger.warning("pricing failed for %s", data.request_id, exc_info=True)
    if data.usage_source == UsageSource.REPORTED:
        _flag_implausible_usage(data)
    row = row_fit_to_columns({name: getattr(data, name) for name in PERSISTED_FIELDS})
    if log and usage_logger.isEnabledFor(logging.INFO):
        usage_logger.info(row_to_json(_with_trace(row, data)))
    return row


def _with_trace(row: Row, data: CallData) -> Row:
    """The row as logged: the record's fields, then the trace's when there is one (a line
    without tracing is exactly what it was before tracing existed)."""
    ids = {name: value for name in ("trace_id", "span_id") if (value := getattr(data, name))}
    return {**row, **ids} if ids else row


def _flag_implausible_usage(data: CallData) -> None:
    model = data.upstream_model or data.requested_model
    try:
        reason = usage_implausible(
            provider_kind=data.provider_kind,
            model=model,
            prompt_tokens=data.prompt_tokens,
            completion_tokens=data.completion_tokens,
            total_tokens=data.total_tokens,
            cached_tokens=data.cached_tokens,
            reasoning_tokens=data.reasoning_tokens,
            max_output_tokens=data.max_output_tokens,
        )
    except Exception:
        logger.warning("usage plausibility check failed for %s", data.request_id, exc_info=True)
        return
    if reason is None:
        return
    data.usage_flagged = True
    logger.warning(
        "implausible usage flagged, kept out of the rollups until accepted in the admin: "
        "request %s attempt %d model %r prompt_tokens=%d completion_tokens=%d total_tokens=%d "
        "(%s)",
        data.request_id,
        data.attempt,
        model,
        data.prompt_tokens,
        data.completion_tokens,
        data.total_tokens,
        reason,
    )


def call_limit_settlements(data: CallData, *, priced: bool = True) -> list[Settlement]:
    """What settles the limits the request and the attempt's key reserved, from what this
    record says was used (its tokens, its cost once priced); once per record. The recorder
    applies a whole batch's in one call to the limiter (one Redis round trip)."""
    request, key = data.limits, data.key_limits
    data.limits = data.key_limits = None
    settlements: list[Settlement] = []
    tokens = data.prompt_tokens + data.completion_tokens
    if request is not None:
        usd = usd_units(data.cost_usd) if priced and data.cost_usd is not None else None
        settlements += request.settlements(tokens=tokens, usd=usd, final=data.final)
    if key is not None:
        settlements += key.settlements(tokens=tokens, usd=None, final=True)
    return settlements


def limits_settle_safely(settlements: list[Settlement]) -> None:
    """Apply settlements, never at the cost of the records: on failure the reservations stand
    in for what was used (the limits err on the safe side)."""
    if not settlements:
        return
    try:
        limits_settle(settlements)
    except Exception:
        logger.exception("settling %d limit counters failed", len(settlements))
