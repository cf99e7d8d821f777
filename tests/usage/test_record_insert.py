"""The recorder's insert (usage.calls.records_insert: COPY on Postgres, one prepared INSERT on
SQLite) stores exactly what bulk_create would, and rows are fitted as they always were."""

from __future__ import annotations

import json
import math
import random
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from django.db import connection, transaction

from tests.usage.conftest import make_call
from usage.calls import PERSISTED_FIELDS, call_prepare, records_insert, rows_as_records
from usage.models import CallRecord, Outcome, UsageSource
from usage.spool import _fit_value, _json_default, row_fit_to_columns, row_to_json

pytestmark = pytest.mark.django_db

_COLUMNS = [f for f in CallRecord._meta.concrete_fields if not f.primary_key]


def every_field_set(request_id: str) -> dict[str, Any]:
    """A row with no column left at its default, with values that test the adapters: an
    offset that is not UTC, microseconds, the cost's last decimal place, text beyond ASCII
    (also in JSON), floats that need every digit, the largest small integers."""
    started = datetime(2025, 3, 30, 1, 59, 59, 999_999, tzinfo=timezone(timedelta(hours=-7)))
    return {
        "request_id": request_id,
        "attempt": 32767,
        "started_at": started,
        "finished_at": started + timedelta(seconds=1, microseconds=1),
        "client": "clïent ✓",
        "requested_model": "gpt-4o-mini",
        "provider": "openai-main",
        "upstream_model": "gpt-4o-mini-2024-07-18",
        "key_id": "openai-1",
        "stream": True,
        "operation": "responses",
        "client_dialect": "anthropic",
        "upstream_dialect": "openai",
        "status_code": 529,
        "outcome": Outcome.SUCCESS,
        "final": True,
        "client_status": 200,
        "error_type": "overloaded_error",
        "prompt_tokens": 2_147_483_647,
        "completion_tokens": 1,
        "total_tokens": 2_147_483_647,
        "cached_tokens": 400,
        "reasoning_tokens": 64,
        "usage_source": UsageSource.REPORTED,
        "usage_flagged": True,
        "latency_ms": 0.1 + 0.2,
        "ttft_ms": 1e-300,
        "ttlt_ms": 123456.789012345,
        "tokens_per_second": 1 / 3,
        "overhead_ms": 2.5e-5,
        "cost_usd": Decimal("12345678.0123456789"),
        "counted_prompt_tokens": 0,
        "forwarded_prompt_tokens": 7,
        "tool_calls": 3,
        "tool_names": ["get_wëather", "lookup", {"nested": [1, 2.5, None, True]}],
        "session_id": "sess-1",
        "turn": 12,
        "user_agent": "openai-python/1.50.0 'quoted' \\ back\\slash \t tab",
        "origin": "https://example.com",
        "app_title": 'An app, "quoted"',
        "captured": True,
        "experiment": "exp-1",
        "arm": "replaced",
        "replacement_attempt": True,
        "replacement_start": True,
    }


def stored(request_id: str) -> tuple[Any, ...]:
    """The row as the database holds it, read without the ORM's conversions."""
    qn = connection.ops.quote_name
    columns = ", ".join(qn(str(f.column)) for f in _COLUMNS)
    table = qn(CallRecord._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT {columns} FROM {table} WHERE request_id = %s",  # noqa: S608
            [request_id],
        )
        rows = cursor.fetchall()
    assert len(rows) == 1
    return tuple(rows[0])


def test_every_field_is_in_the_row_set_above() -> None:
    assert set(every_field_set("x")) == {f.attname for f in _COLUMNS} == set(PERSISTED_FIELDS)


@pytest.mark.parametrize("nulls", [False, True])
def test_the_insert_stores_what_bulk_create_stores(nulls: bool) -> None:
    by_orm, by_insert, by_model = (
        every_field_set("orm"),
        every_field_set("fast"),
        every_field_set("model"),
    )
    if nulls:
        for row in (by_orm, by_insert, by_model):
            for f in _COLUMNS:
                if f.null:
                    row[f.attname] = None
    with transaction.atomic():
        CallRecord.objects.bulk_create([CallRecord(**by_orm)])
        records_insert(rows_as_records([by_insert]))
        records_insert([CallRecord(**by_model)])  # seeding and tests hand model instances
    reference = stored("orm")[1:]
    assert stored("fast")[1:] == reference
    assert stored("model")[1:] == reference
    # And the ORM reads them back alike.
    read = {r["request_id"]: r for r in CallRecord.objects.values(*PERSISTED_FIELDS)}
    for name in ("fast", "model"):
        assert {**read[name], "request_id": "orm"} == read["orm"]


def test_prepared_rows_of_the_recorder_store_what_bulk_create_stores() -> None:
    rows = [
        call_prepare(
            make_call(
                request_id=f"req-{i}",
                prompt_tokens=1000 + i,
                completion_tokens=20 * i,
                cached_tokens=300 if i % 2 else 0,
                usage_source=UsageSource.REPORTED,
                tool_names=["a", "b"] if i % 3 else [],
                ttft_ms=None if i % 2 else 12.25,
            ),
            log=False,
        )
        for i in range(6)
    ]
    with transaction.atomic():
        CallRecord.objects.bulk_create([CallRecord(**r) for r in rows])
        records_insert(rows_as_records({**r, "request_id": r["request_id"] + "-x"} for r in rows))
    for r in rows:
        assert stored(r["request_id"] + "-x")[1:] == stored(r["request_id"])[1:]


# --- row_fit_to_columns and the JSON line, against what they did before their fast paths ---


def fit_reference(row: dict[str, Any]) -> dict[str, Any]:
    for field in CallRecord._meta.concrete_fields:
        name = field.attname
        value = row.get(name)
        if value is None or field.primary_key:
            continue
        try:
            row[name] = _fit_value(field, value)
        except Exception:
            row[name] = None if field.null else field.get_default()
    return row


_ODD_VALUES: list[Any] = [
    None, True, False, 0, -1, 1, 32767, 32768, 2**31, -(2**40), 1.5, -0.0, math.nan, math.inf,
    -math.inf, "", "x", "y" * 300, Outcome.SUCCESS, UsageSource.REPORTED, Decimal("1.23456789012"),
    Decimal("1e9"), Decimal("NaN"), [], ["a"], {"k": 1}, object(), b"bytes",
    datetime(2025, 1, 1, tzinfo=UTC),
]  # fmt: skip


def test_fitting_rows_gives_what_it_gave_field_by_field() -> None:
    rnd = random.Random(7)
    for _ in range(400):
        row = every_field_set("r")
        for name in rnd.sample(sorted(row), k=rnd.randint(0, 8)):
            row[name] = rnd.choice(_ODD_VALUES)
        if rnd.random() < 0.2:
            del row[rnd.choice(sorted(row))]
        fast, slow = row_fit_to_columns(dict(row)), fit_reference(dict(row))
        assert list(fast) == list(slow)
        for name in slow:
            a, b = fast[name], slow[name]
            assert type(a) is type(b), name
            assert a is b or a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))


def test_the_json_line_is_what_json_dumps_gives() -> None:
    row = row_fit_to_columns(every_field_set("j"))
    assert row_to_json(row) == json.dumps(row, default=_json_default, separators=(",", ":"))
