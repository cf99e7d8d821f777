"""Writing rollups: a batch of call records becomes one upsert per bucket and resolution.

The recorder calls `rollups_upsert` inside the transaction that inserts the records, so records
and rollups commit (or fail and are retried) together. The batch is first summed in Python, so
each (bucket, dimensions) appears once per statement; then every resolution is upserted with

    INSERT … ON CONFLICT (bucket_start, dims…) DO UPDATE SET c = c + EXCLUDED.c, …

which is atomic on Postgres and SQLite (≥ 3.24) alike: two writers adding to the same bucket
both land, whichever commits first. Rows are sent in one fixed order (bucket, then dimensions)
so that two Postgres writers touching the same buckets lock them in the same order and cannot
deadlock; a failed batch is retried by the recorder anyway.

Columns that are zero are sent as NULL (see the note in usage/models.py), so additive columns
merge as COALESCE(old + new, old, new), and min/max keep whichever side is not NULL.

A record whose reported usage was flagged as implausible (CallRecord.usage_flagged) counts as a
call, with its outcome and timings, but adds no tokens and no cost until an operator accepts
it: `flagged_usage_accept` then adds exactly those.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from functools import reduce
from operator import or_
from typing import Any

from django.db import connection, models, transaction
from django.db.models import F, Q, Value
from django.db.models.functions import Coalesce

from usage.histograms import METRICS
from usage.models import (
    COST_SCALE,
    COUNT_COLUMNS,
    OUTCOME_COLUMNS,
    ROLLUP_DIMENSIONS,
    SESSION_ROLLUP_KEY,
    TOKEN_COLUMNS,
    Arm,
    CallRecord,
    DayRollup,
    HourRollup,
    MinuteRollup,
    Outcome,
    ReplacementTurnRollup,
    SessionRollup,
    ToolRollup,
    UsageRollup,
    UsageSource,
)
from usage.sketches import EMPTY as SKETCH_EMPTY
from usage.sketches import sketch_merge, sketch_position

# Resolutions, finest first: (model, bucket length in seconds).
RESOLUTIONS: tuple[tuple[type[UsageRollup], int], ...] = (
    (MinuteRollup, 60),
    (HourRollup, 3600),
    (DayRollup, 86400),
)

# The accumulator is a flat list: additive columns first, then (min, max) per metric.
ADDITIVE_COLUMNS: tuple[str, ...] = (
    "calls",
    *COUNT_COLUMNS,
    *OUTCOME_COLUMNS.values(),
    *TOKEN_COLUMNS,
    "cost_e10",
    "cost_sq",
    "priced_requests",
    *(
        column
        for metric in METRICS
        for column in (f"{metric.prefix}_count", f"{metric.prefix}_sum", *metric.bin_columns())
    ),
)
MIN_COLUMNS = tuple(f"{m.prefix}_min" for m in METRICS)
MAX_COLUMNS = tuple(f"{m.prefix}_max" for m in METRICS)
VALUE_COLUMNS = (*ADDITIVE_COLUMNS, *MIN_COLUMNS, *MAX_COLUMNS)

_N_ADD = len(ADDITIVE_COLUMNS)
_N_METRICS = len(METRICS)
_INDEX = {name: i for i, name in enumerate(ADDITIVE_COLUMNS)}
_OUTCOME_INDEX = {outcome: _INDEX[column] for outcome, column in OUTCOME_COLUMNS.items()}
_TOKEN_INDEX = tuple((name, _INDEX[name]) for name in TOKEN_COLUMNS[:5])
_REPORTED, _ESTIMATED = _INDEX["reported_tokens"], _INDEX["estimated_tokens"]
_REQUESTS, _TOOL_CALLS = _INDEX["requests"], _INDEX["tool_calls"]
_COUNTED, _FORWARDED = _INDEX["counted_prompt_tokens"], _INDEX["forwarded_prompt_tokens"]
_RECONCILED_REPORTED = _INDEX["reconciled_reported_tokens"]
_RECONCILED_COUNTED = _INDEX["reconciled_counted_tokens"]
_COST, _COST_SQ, _PRICED = _INDEX["cost_e10"], _INDEX["cost_sq"], _INDEX["priced_requests"]
# What a flagged record leaves out until accepted: every token column and the cost.
_USAGE_COLUMNS = (*TOKEN_COLUMNS, "cost_e10", "cost_sq", "priced_requests")
_ESTIMATED_SOURCES = frozenset({UsageSource.ESTIMATED, UsageSource.EXTRAPOLATED})
# Per metric: (record field, index of its count column, index of its first bin, the Metric).
_METRIC_SLOTS = tuple(
    (m.name, _INDEX[f"{m.prefix}_count"], _INDEX[f"{m.prefix}_h00"], m) for m in METRICS
)
_COST_FACTOR = Decimal(10) ** COST_SCALE

Key = tuple[Any, ...]  # (bucket epoch seconds, *dimensions)
Acc = list[Any]


def _new_acc() -> Acc:
    return [0] * _N_ADD + [None] * (2 * _N_METRICS)


def _key(r: CallRecord) -> Key:
    started = int(r.started_at.timestamp())
    ok = r.outcome == Outcome.SUCCESS.value
    status = (r.client_status or 0) if r.final else 0
    return (started - started % 60, r.provider, r.requested_model, r.upstream_model, r.key_id,
            r.client, bool(r.stream), ok, status, r.operation, r.experiment, r.arm)  # fmt: skip


def _add_usage(acc: Acc, r: CallRecord) -> None:
    for name, index in _TOKEN_INDEX:
        acc[index] += getattr(r, name) or 0
    if r.usage_source in _ESTIMATED_SOURCES:
        acc[_ESTIMATED] += r.total_tokens or 0
    elif r.usage_source == UsageSource.REPORTED:
        acc[_REPORTED] += r.total_tokens or 0
    if r.cost_usd is not None:
        acc[_COST] += int(Decimal(r.cost_usd) * _COST_FACTOR)
        acc[_COST_SQ] += float(r.cost_usd) ** 2
    # Known, or nothing to price: no tokens used (an error, a refusal) costs nothing.
    if r.final and (r.cost_usd is not None or not (r.prompt_tokens or r.completion_tokens)):
        acc[_PRICED] += 1
    counted = r.counted_prompt_tokens
    if counted is not None:
        acc[_COUNTED] += counted
        acc[_FORWARDED] += r.forwarded_prompt_tokens or 0
        if r.usage_source == UsageSource.REPORTED:
            acc[_RECONCILED_REPORTED] += r.prompt_tokens or 0
            acc[_RECONCILED_COUNTED] += counted


def rollups_aggregate(records: Iterable[CallRecord]) -> dict[Key, Acc]:
    """Sum records into per-minute accumulators keyed by (minute epoch, *dimensions)."""
    out: dict[Key, Acc] = {}
    for r in records:
        key = _key(r)
        acc = out.get(key)
        if acc is None:
            acc = out[key] = _new_acc()
        # `calls` are upstream attempts; a request answered without one has an attempt-0 row
        # that counts only as a request.
        if r.attempt:
            acc[0] += 1
        if r.final:
            acc[_REQUESTS] += 1
        acc[_TOOL_CALLS] += r.tool_calls or 0
        slot = _OUTCOME_INDEX.get(r.outcome)
        if slot is not None:
            acc[slot] += 1
        if not r.usage_flagged:
            _add_usage(acc, r)
        for position, (field, count_index, bin_index, metric) in enumerate(_METRIC_SLOTS):
            value = getattr(r, field)
            if value is None:
                continue
            acc[count_index] += 1
            acc[count_index + 1] += value
            acc[bin_index + metric.bin_of(value)] += 1
            low, high = _N_ADD + position, _N_ADD + _N_METRICS + position
            if acc[low] is None or value < acc[low]:
                acc[low] = value
            if acc[high] is None or value > acc[high]:
                acc[high] = value
    return out


def rollups_coarsen(rows: dict[Key, Acc], *, seconds: int) -> dict[Key, Acc]:
    """Merge accumulators into buckets of `seconds` (a multiple of the input's)."""
    out: dict[Key, Acc] = {}
    for key, acc in rows.items():
        coarse = (key[0] - key[0] % seconds, *key[1:])
        target = out.get(coarse)
        if target is None:
            out[coarse] = list(acc)
            continue
        for i in range(_N_ADD):
            target[i] += acc[i]
        for i in range(_N_ADD, _N_ADD + _N_METRICS):
            if acc[i] is not None and (target[i] is None or acc[i] < target[i]):
                target[i] = acc[i]
        for i in range(_N_ADD + _N_METRICS, _N_ADD + 2 * _N_METRICS):
            if acc[i] is not None and (target[i] is None or acc[i] > target[i]):
                target[i] = acc[i]
    return out


def rollups_upsert(*, records: Sequence[CallRecord]) -> None:
    """Add `records` to every rollup resolution. Call inside the records' transaction."""
    if not records:
        return
    rows = rollups_aggregate(records)
    levels = []
    for model, seconds in RESOLUTIONS:
        if seconds != 60:
            rows = rollups_coarsen(rows, seconds=seconds)
        levels.append((model, rows))
    if connection.vendor == "postgresql":
        _upsert_postgres(levels)
    else:
        for model, level_rows in levels:
            _upsert_sqlite(model, level_rows)
    _sessions_upsert(records)
    _tools_upsert(records)
    _replacement_turns_upsert(records)


def _hour(r: CallRecord) -> datetime:
    started = int(r.started_at.timestamp())
    return datetime.fromtimestamp(started - started % 3600, UTC)


SESSION_PERIODS = (3600, 86400)


def _sessions_upsert(records: Sequence[CallRecord]) -> None:
    """Per (hour or day, client, provider, route): requests with a session id, their tokens,
    and the sketch of the ids (usage.sketches), merged into the stored one.

    A sketch merges by a per-byte maximum, which neither database has for its binary type,
    so the stored rows are read under a lock and written back: first inserted empty where
    missing, then read with FOR UPDATE (Postgres; SQLite's single writer already holds the
    database from that insert on), in key order like the other rollups, so that concurrent
    writers wait for each other rather than lose a merge or deadlock."""
    rows: dict[tuple[Any, ...], list[Any]] = {}
    for r in records:
        if not r.session_id:
            continue
        started = int(r.started_at.timestamp())
        position = sketch_position(r.session_id)
        experiment = r.experiment if r.arm == Arm.REPLACED else ""
        for seconds in SESSION_PERIODS:
            bucket = datetime.fromtimestamp(started - started % seconds, UTC)
            key = (seconds, bucket, r.client, r.provider, r.requested_model, experiment)
            acc = rows.setdefault(key, [0, 0, bytearray(SKETCH_EMPTY)])
            acc[0] += 1 if r.final else 0
            acc[1] += 0 if r.usage_flagged else (r.total_tokens or 0)
            register, rank = position
            if acc[2][register] < rank:
                acc[2][register] = rank
    if not rows:
        return
    qn = connection.ops.quote_name
    t = qn(SessionRollup._meta.db_table)
    names = SESSION_ROLLUP_KEY
    keys = sorted(rows)
    adapt = connection.ops.adapt_datetimefield_value
    params = [(k[0], adapt(k[1]), *k[2:]) for k in keys]
    columns = ", ".join(qn(c) for c in names)
    lock = " FOR UPDATE" if connection.features.has_select_for_update else ""
    with connection.cursor() as cursor:
        cursor.executemany(
            f"INSERT INTO {t} ({columns}, requests, total_tokens, sketch) "  # noqa: S608
            f"VALUES (%s, %s, %s, %s, %s, %s, 0, 0, %s) ON CONFLICT ({columns}) DO NOTHING",
            [(*p, SKETCH_EMPTY) for p in params],
        )
        match = " AND ".join(f"{qn(c)} = %s" for c in names)
        stored: list[tuple[Any, ...]] = []
        for p in params:  # one indexed lookup each, in key order (the locks' order)
            cursor.execute(
                f"SELECT id, requests, total_tokens, sketch FROM {t} WHERE {match}{lock}",  # noqa: S608
                p,
            )
            stored.append(cursor.fetchone())
        cursor.executemany(
            f"UPDATE {t} SET requests = %s, total_tokens = %s, sketch = %s WHERE id = %s",  # noqa: S608
            [
                (
                    row[1] + rows[k][0],
                    row[2] + rows[k][1],
                    sketch_merge((bytes(row[3]), bytes(rows[k][2]))),
                    row[0],
                )
                for k, row in zip(keys, stored, strict=True)
            ],
        )


def _tools_upsert(records: Sequence[CallRecord]) -> None:
    """Per (hour, tool name, client, provider, route): how many calls named it."""
    rows: dict[tuple[Any, ...], list[int]] = {}
    for r in records:
        for name in r.tool_names or ():
            key = (_hour(r), str(name), r.client, r.provider, r.requested_model)
            rows.setdefault(key, [0])[0] += 1
    _side_upsert(
        ToolRollup,
        keys=("bucket_start", "tool_name", "client", "provider", "requested_model"),
        sums=("calls",),
        rows=rows,
    )


def _replacement_turns_upsert(records: Sequence[CallRecord]) -> None:
    """Per (hour, rule, turn): the requests that began their session's replacement there."""
    rows: dict[tuple[Any, ...], list[int]] = {}
    for r in records:
        if r.final and r.replacement_start:
            rows.setdefault((_hour(r), r.experiment, r.turn), [0])[0] += 1
    _side_upsert(
        ReplacementTurnRollup, keys=("bucket_start", "experiment", "turn"), sums=("starts",),
        rows=rows,
    )  # fmt: skip


def _side_upsert(
    model: type[models.Model],
    *,
    keys: tuple[str, ...],
    sums: tuple[str, ...],
    rows: dict[tuple[Any, ...], list[int]],
) -> None:
    """INSERT … ON CONFLICT DO UPDATE adding `sums`, in one order (as the main rollups) so
    that concurrent writers cannot deadlock."""
    if not rows:
        return
    qn = connection.ops.quote_name
    t = qn(model._meta.db_table)
    columns = (*keys, *sums)
    sets = [f"{qn(c)} = {t}.{qn(c)} + EXCLUDED.{qn(c)}" for c in sums]
    sql = (
        f"INSERT INTO {t} ({', '.join(qn(c) for c in columns)}) "  # noqa: S608
        f"VALUES ({', '.join(['%s'] * len(columns))}) "
        f"ON CONFLICT ({', '.join(qn(c) for c in keys)}) DO UPDATE SET {', '.join(sets)}"
    )
    adapt = connection.ops.adapt_datetimefield_value
    params = [(adapt(key[0]), *key[1:], *acc) for key, acc in sorted(rows.items())]
    with connection.cursor() as cursor:
        cursor.executemany(sql, params)


def flagged_usage_accept(*, record_ids: Iterable[int]) -> int:
    """Clear the flag of these records and add their tokens and cost (nothing else: their
    calls and timings were counted when they were written) to every rollup resolution, in one
    transaction. Records not flagged (any more) are skipped, so accepting twice adds once.
    Returns how many were accepted."""
    with transaction.atomic():
        # Locked, and re-read under the lock on Postgres: a concurrent accept of the same
        # records waits here, then finds them no longer flagged.
        records = list(
            CallRecord.objects.select_for_update()
            .filter(pk__in=list(record_ids), usage_flagged=True)
            .order_by("pk")
        )
        if not records:
            return 0
        CallRecord.objects.filter(pk__in=[r.pk for r in records]).update(usage_flagged=False)
        rows: dict[Key, Acc] = {}
        for r in records:
            _add_usage(rows.setdefault(_key(r), _new_acc()), r)
        for model, seconds in RESOLUTIONS:
            if seconds != 60:
                rows = rollups_coarsen(rows, seconds=seconds)
            where = {key: _bucket_q(key) for key in rows}
            # Lock the rows in the writers' order (the database's, collation included) so a
            # concurrent batch touching the same buckets cannot deadlock with this.
            locking = model._default_manager.select_for_update().filter(reduce(or_, where.values()))
            list(locking.order_by("bucket_start", *ROLLUP_DIMENSIONS).values_list("pk"))
            for key, acc in rows.items():
                added = {
                    c: Coalesce(F(c), Value(0)) + acc[_INDEX[c]]
                    for c in _USAGE_COLUMNS
                    if acc[_INDEX[c]]
                }
                # An update, not an upsert: a bucket missing now was pruned, and stays so.
                if added:
                    model._default_manager.filter(where[key]).update(**added)
    return len(records)


def _bucket_q(key: Key) -> Q:
    dimensions = dict(zip(ROLLUP_DIMENSIONS, key[1:], strict=True))
    return Q(bucket_start=datetime.fromtimestamp(key[0], UTC), **dimensions)


# --- SQL --------------------------------------------------------------------------------------
# Statements are built from column names defined in code (never from input), hence the S608
# suppressions below.

_COLUMNS = ("bucket_start", *ROLLUP_DIMENSIONS, *VALUE_COLUMNS)
_PG_STAGE = "llmrotate_rollup_stage"
_PG_COPY_TYPES = {
    "DateTimeField": "timestamptz",
    "CharField": "text",
    "BooleanField": "bool",
    "SmallIntegerField": "int2",
    "IntegerField": "int4",
    "BigIntegerField": "int8",
    "FloatField": "float8",
}
_sql_cache: dict[tuple[str, str, int], str] = {}


def _upsert_sql(model: type[UsageRollup], rows: int) -> str:
    """The upsert for `rows` rows of VALUES (SQLite), or from the stage table (Postgres)."""
    table = model._meta.db_table
    cache_key = (connection.vendor, table, rows)
    cached = _sql_cache.get(cache_key)
    if cached is not None:
        return cached
    qn = connection.ops.quote_name
    t = qn(table)
    columns = ", ".join(qn(c) for c in _COLUMNS)
    dims = ", ".join(qn(c) for c in ("bucket_start", *ROLLUP_DIMENSIONS))
    if connection.vendor == "postgresql":
        # Ordered, so that concurrent writers lock rows in the same order (no deadlocks).
        source = f"SELECT {columns} FROM {_PG_STAGE} WHERE res = %s ORDER BY {dims}"  # noqa: S608
    else:
        source = "VALUES " + ", ".join(["(" + ", ".join(["%s"] * len(_COLUMNS)) + ")"] * rows)
    sets = [f"{qn(c)} = COALESCE({t}.{qn(c)} + EXCLUDED.{qn(c)}, {t}.{qn(c)}, EXCLUDED.{qn(c)})"
            for c in ADDITIVE_COLUMNS]  # fmt: skip
    for names, op in ((MIN_COLUMNS, "<"), (MAX_COLUMNS, ">")):
        sets += [
            f"{qn(c)} = COALESCE(CASE WHEN EXCLUDED.{qn(c)} {op} {t}.{qn(c)} "
            f"THEN EXCLUDED.{qn(c)} ELSE {t}.{qn(c)} END, EXCLUDED.{qn(c)})"
            for c in names
        ]
    sql = (
        f"INSERT INTO {t} ({columns}) {source} ON CONFLICT ({dims}) DO UPDATE SET {', '.join(sets)}"
    )
    _sql_cache[cache_key] = sql
    return sql


def _row_values(key: Key, acc: Acc, adapt: Any) -> list[Any]:
    # Zero → NULL for additive columns but `calls`, which is NOT NULL (and 0 on a row of
    # requests answered without an attempt); min/max are already None when unseen.
    return [
        adapt(datetime.fromtimestamp(key[0], UTC)),
        *key[1:],
        acc[0],
        *[v or None for v in acc[1:_N_ADD]],
        *acc[_N_ADD:],
    ]


def _upsert_sqlite(model: type[UsageRollup], rows: dict[Key, Acc]) -> None:
    # One row per execution of one statement: SQLite prepares it once, and Django turns its
    # placeholders into SQLite's once, where a statement of many rows (its text different for
    # each count of rows) was converted and prepared anew each time, most of the write's CPU.
    adapt = connection.ops.adapt_datetimefield_value
    values = [_row_values(key, acc, adapt) for key, acc in sorted(rows.items())]
    with connection.cursor() as cursor:
        cursor.executemany(_upsert_sql(model, 1), values)


def _upsert_postgres(levels: list[tuple[type[UsageRollup], dict[Key, Acc]]]) -> None:
    """COPY every level's rows into a temporary stage table, then upsert from it: a VALUES
    list of this width spends more time in parsing than in writing."""
    import psycopg

    connection.ensure_connection()
    qn = connection.ops.quote_name
    columns = ", ".join(qn(c) for c in _COLUMNS)
    base = MinuteRollup._meta
    types = ["int2"] + [
        _PG_COPY_TYPES[base.get_field(name).get_internal_type()] for name in _COLUMNS
    ]
    # A server-binding cursor on Django's connection: same transaction, binary COPY.
    with psycopg.Cursor(connection.connection) as cursor:
        cursor.execute(
            f"CREATE TEMPORARY TABLE IF NOT EXISTS {_PG_STAGE} ON COMMIT DELETE ROWS AS "  # noqa: S608
            f"SELECT 0::smallint AS res, {columns} FROM {qn(base.db_table)} WITH NO DATA"
        )
        with cursor.copy(f"COPY {_PG_STAGE} (res, {columns}) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(types)
            for level, (_, rows) in enumerate(levels):
                for key, acc in rows.items():
                    copy.write_row([level, *_row_values(key, acc, _identity)])
        for level, (model, _) in enumerate(levels):
            cursor.execute(_upsert_sql(model, 0), [level])
        # The stage empties at commit anyway; emptying it now keeps a caller's longer
        # transaction (spool replay writes several batches in one) from upserting rows twice.
        cursor.execute(f"DELETE FROM {_PG_STAGE}")  # noqa: S608


def _identity(value: Any) -> Any:
    return value
