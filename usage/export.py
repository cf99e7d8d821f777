"""Call records as CSV, JSON Lines or JSON, produced chunk by chunk.

Shared by `/api/usage/export` and `manage.py export_usage`. On Postgres the database formats
and streams the rows (usage/export_postgres.py); elsewhere this module does, from keyset chunks
(usage_export_rows). Either way memory stays at one chunk, and each yielded string is big
enough that the per-chunk overhead of a streaming response is negligible.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from datetime import datetime
from decimal import Decimal
from typing import Any

from asgiref.sync import sync_to_async
from django.db import connection

from common.timeframes import TimeFrame
from usage.filters import UsageFilters
from usage.models import CallRecord
from usage.record_selectors import RECORD_FIELDS, usage_export_rows

FORMATS = ("csv", "jsonl", "json")
CONTENT_TYPES = {
    "csv": "text/csv; charset=utf-8",
    "jsonl": "application/x-ndjson",
    "json": "application/json",
}
_DATETIME_COLUMNS = frozenset(
    i for i, name in enumerate(RECORD_FIELDS) if name in ("started_at", "finished_at")
)
_COST_COLUMN = RECORD_FIELDS.index("cost_usd")
# A spreadsheet runs a cell that starts with one of these as a formula, and error codes,
# client and route names come from upstreams and clients. OWASP's advice for CSV: prefix such
# a text cell with a quote. https://owasp.org/www-community/attacks/CSV_Injection
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
TEXT_FIELDS = frozenset(
    name
    for name in RECORD_FIELDS
    if CallRecord._meta.get_field(name).get_internal_type() in ("CharField", "TextField")
)
_TEXT_COLUMNS = frozenset(i for i, name in enumerate(RECORD_FIELDS) if name in TEXT_FIELDS)
# Lists (tool names): a CSV cell holds their JSON text, as Postgres prints its jsonb. It starts
# with "[", so no name in it can make the cell a formula.
JSON_FIELDS = frozenset(
    name
    for name in RECORD_FIELDS
    if CallRecord._meta.get_field(name).get_internal_type() == "JSONField"
)
_JSON_COLUMNS = frozenset(i for i, name in enumerate(RECORD_FIELDS) if name in JSON_FIELDS)
_json_text = json.JSONEncoder(ensure_ascii=False).encode


def _plain(row: tuple[Any, ...]) -> list[Any]:
    values = list(row)  # the same text as Postgres' COPY gives (usage/export_postgres.py)
    for i in _DATETIME_COLUMNS:
        values[i] = values[i].isoformat()
    cost = values[_COST_COLUMN]
    if cost is not None:
        # JSON has no decimal type; a string keeps all ten decimal places.
        values[_COST_COLUMN] = format(cost, "f") if isinstance(cost, Decimal) else str(cost)
    return values


class _CsvWriter:
    """csv.writer for the export: rows end in "\n" as COPY's do; a text cell that starts like a
    formula gets a quote in front; a cell holding a bare "\r" is quoted, as COPY does (Python's
    csv before 3.11.9 leaves it bare, and a spreadsheet starts a new row there)."""

    def __init__(self) -> None:
        self.buffer = io.StringIO()
        self._writer = csv.writer(self.buffer, lineterminator="\n")
        # With "\r\n" ending its rows, csv quotes every field holding a "\r" on any Python.
        self._cr_buffer = io.StringIO()
        self._cr_writer = csv.writer(self._cr_buffer, lineterminator="\r\n")

    def writerow(self, values: list[Any]) -> None:
        bare_cr = False
        for i in _TEXT_COLUMNS:
            value = values[i]
            if isinstance(value, str):
                if value.startswith(FORMULA_STARTS):
                    values[i] = "'" + value
                bare_cr = bare_cr or "\r" in value
        if not bare_cr:
            self._writer.writerow(values)
            return
        self._cr_writer.writerow(values)
        self.buffer.write(self._cr_buffer.getvalue()[:-2] + "\n")
        self._cr_buffer.seek(0)
        self._cr_buffer.truncate()

    def take(self) -> str:
        text = self.buffer.getvalue()
        self.buffer.seek(0)
        self.buffer.truncate()
        return text


def _csv_chunks(chunks: Iterable[list[tuple[Any, ...]]]) -> Iterator[str]:
    out = _CsvWriter()
    out.writerow(list(RECORD_FIELDS))
    for chunk in chunks:
        for row in chunk:
            values = _plain(row)
            for i in _JSON_COLUMNS:
                if values[i] is not None:
                    values[i] = _json_text(values[i])
            out.writerow(values)
        yield out.take()
    if text := out.take():
        yield text


def _json_objects(chunks: Iterable[list[tuple[Any, ...]]]) -> Iterator[list[str]]:
    dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
    for chunk in chunks:
        yield [dumps(dict(zip(RECORD_FIELDS, _plain(row), strict=True))) for row in chunk]


def _jsonl_chunks(chunks: Iterable[list[tuple[Any, ...]]]) -> Iterator[str]:
    for objects in _json_objects(chunks):
        yield "".join(obj + "\n" for obj in objects)


def _json_chunks(chunks: Iterable[list[tuple[Any, ...]]]) -> Iterator[str]:
    first = True
    yield "["
    for objects in _json_objects(chunks):
        if objects:
            yield ("\n" if first else ",\n") + ",\n".join(objects)
            first = False
    yield "\n]\n"


_WRITERS: dict[str, Callable[[Iterable[list[tuple[Any, ...]]]], Iterator[str]]] = {
    "csv": _csv_chunks,
    "jsonl": _jsonl_chunks,
    "json": _json_chunks,
}


class CountingRows:
    """Wraps the row chunks to count rows as they pass (for progress display)."""

    def __init__(
        self, chunks: Iterable[list[tuple[Any, ...]]], on_rows: Callable[[int], None] | None
    ) -> None:
        self.chunks = chunks
        self.on_rows = on_rows
        self.count = 0

    def __iter__(self) -> Iterator[list[tuple[Any, ...]]]:
        for chunk in self.chunks:
            self.count += len(chunk)
            if self.on_rows:
                self.on_rows(self.count)
            yield chunk


def usage_export(
    *,
    frame: TimeFrame,
    filters: UsageFilters,
    fmt: str,
    on_rows: Callable[[int], None] | None = None,
) -> Iterator[str]:
    """The export as text chunks, oldest record first."""
    if connection.vendor == "postgresql":
        from usage.export_postgres import export_copy

        return export_copy(frame=frame, filters=filters, fmt=fmt, on_rows=on_rows)
    rows = CountingRows(usage_export_rows(frame=frame, filters=filters), on_rows)
    return _WRITERS[fmt](rows)


async def iterate_async(chunks: Iterator[str]) -> AsyncIterator[str]:
    """Serve a sync chunk iterator to an ASGI server one chunk at a time.

    Django consumes a synchronous iterator under ASGI by loading it whole into a list; this
    pulls each chunk (one database query) through sync_to_async instead.
    """
    done = object()
    try:
        while True:
            chunk = await sync_to_async(_next_or, thread_sensitive=True)(chunks, done)
            if chunk is done:
                return
            yield chunk
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            await sync_to_async(close, thread_sensitive=True)()


def _next_or(chunks: Iterator[str], default: object) -> Any:
    return next(chunks, default)


def export_filename(*, fmt: str, now: datetime) -> str:
    return f"llmrotate-usage-{now:%Y%m%dT%H%M%SZ}.{fmt}"
