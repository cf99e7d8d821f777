"""One upstream attempt as the recorder receives it (CallData), what happens to it before it
is written (token estimate, price, plausibility, the JSON log line: `call_prepare`), and the
write itself (`calls_write`: records and rollups in one transaction).

usage.recorder runs these on its threads; the seeding command and spool replay use them too, so
every record is prepared and written the same way whatever its path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime
from decimal import Decimal
from functools import partial
from operator import attrgetter
from types import SimpleNamespace
from typing import Any

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connections, models, transaction
from django.db.backends.base.base import BaseDatabaseWrapper

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
_persisted_values = attrgetter(*PERSISTED_FIELDS)


def calls_write(
    records: Sequence[CallRecord], *, insert: Callable[[list[CallRecord]], None] | None = None
) -> None:
    """Write one batch in one transaction: the records and their rollups commit (or fail and
    are retried) together. The recorder, spool replay (see usage/spool.py) and the seeding
    command (with a faster `insert`: COPY) all write through here.

    A record is a CallRecord or anything with its attributes (`rows_as_records`); its id is
    not read back."""
    with transaction.atomic():
        if insert is None:
            records_insert(records)
        else:
            insert(list(records))
        rollups_upsert(records=records)


def rows_as_records(rows: Iterable[Row]) -> list[CallRecord]:
    """Rows (`call_prepare`'s) as what `calls_write` reads: the record's attributes, without
    building a model instance (several times the cost, and the write needs none)."""
    # Typed as the model: everything that reads them reads only the persisted fields.
    return [SimpleNamespace(**row) for row in rows]  # type: ignore[misc]


# How records go in, per database vendor: one statement built once, and per column how its
# value is made ready. That is Django's own `get_db_prep_save` (what bulk_create calls), but
# skipped for the types of value it returns as they are (None, and text, numbers and booleans
# in their own columns), which is checked when the statement is built. On Postgres the rows
# are COPied (text format), where an integer Django would wrap for psycopg (Int4(7)) reads
# the same as the plain one (7), so it is passed as it is too.
_InsertColumn = tuple[str, frozenset[type], "models.Field[Any, Any]"]
_insert_plans: dict[str, tuple[str, tuple[_InsertColumn, ...]]] = {}
_PASS_SAMPLES: dict[str, tuple[Any, ...]] = {
    "CharField": ("", "x"),
    "BooleanField": (False, True),
    "FloatField": (0.0, 1.5),
    "IntegerField": (0, 7, 40_000),
    "PositiveIntegerField": (0, 7, 40_000),
    "PositiveSmallIntegerField": (0, 7, 30_000),
    "SmallIntegerField": (0, 7, 30_000),
    "BigIntegerField": (0, 7, 40_000),
}


def _insert_plan(db: BaseDatabaseWrapper) -> tuple[str, tuple[_InsertColumn, ...]]:
    plan = _insert_plans.get(db.vendor)
    if plan is not None:
        return plan
    qn = db.ops.quote_name
    copy = db.vendor == "postgresql"
    # bulk_create's columns: every concrete field but the id, which the database assigns.
    persisted = [f for f in CallRecord._meta.concrete_fields if not f.primary_key]
    table = qn(CallRecord._meta.db_table)
    names = ", ".join(qn(str(f.column)) for f in persisted)
    if copy:
        sql = f"COPY {table} ({names}) FROM STDIN"
    else:
        sql = f"INSERT INTO {table} ({names}) VALUES ({', '.join(['%s'] * len(persisted))})"  # noqa: S608 - names from the model

    def unchanged(value: Any, prepared: Any) -> bool:
        if prepared is value:
            return True
        return (
            copy
            and type(value) is int
            and isinstance(prepared, int)
            and prepared == value
            and str(prepared) == str(value)
        )

    columns = []
    for model_field in persisted:
        samples = _PASS_SAMPLES.get(model_field.get_internal_type(), ())
        passes: set[type] = set()
        if model_field.get_db_prep_save(None, connection=db) is None:
            passes.add(type(None))
        if samples and all(
            unchanged(v, model_field.get_db_prep_save(v, connection=db)) for v in samples
        ):
            passes.add(type(samples[0]))
        columns.append((model_field.attname, frozenset(passes), model_field))
    plan = _insert_plans[db.vendor] = (sql, tuple(columns))
    return plan


def records_insert(records: Iterable[CallRecord]) -> None:
    """Insert the records as bulk_create would, with the same value in each column, without
    an ORM query per batch: COPY on Postgres, one prepared INSERT executed per record on
    SQLite."""
    db = connections[DEFAULT_DB_ALIAS]  # this thread's, not the proxy (a lookup per access)
    sql, columns = _insert_plan(db)
    steps = [
        (name, passes, partial(model_field.get_db_prep_save, connection=db))
        for name, passes, model_field in columns
    ]
    params: list[list[Any]] = [
        [
            value if type(value) in passes else prep(value)
            for name, passes, prep in steps
            for value in (getattr(record, name),)
        ]
        for record in records
    ]
    if not params:
        return
    with db.cursor() as cursor:
        if db.vendor == "postgresql":
            # The psycopg cursor under Django's wrapper: same connection and transaction.
            with cursor.cursor.copy(sql) as copy:
                for row in params:
                    copy.write_row(row)
        else:
            cursor.executemany(sql, params)


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
    row = row_fit_to_columns(dict(zip(PERSISTED_FIELDS, _persisted_values(data), strict=True)))
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
