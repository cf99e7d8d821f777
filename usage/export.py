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

from usage.filters import UsageFilters
from usage.record_selectors import RECORD_FIELDS, usage_export_rows
from usage.timeframes import TimeFrame

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


def _plain(row: tuple[Any, ...]) -> list[Any]:
    values = list(row)  # the same text as Postgres' COPY gives (usage/export_postgres.py)
    for i in _DATETIME_COLUMNS:
        values[i] = values[i].isoformat()
    cost = values[_COST_COLUMN]
    if cost is not None:
        # JSON has no decimal type; a string keeps all ten decimal places.
        values[_COST_COLUMN] = format(cost, "f") if isinstance(cost, Decimal) else str(cost)
    return values


def _csv_chunks(chunks: Iterable[list[tuple[Any, ...]]]) -> Iterator[str]:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(RECORD_FIELDS)
    for chunk in chunks:
        writer.writerows(_plain(row) for row in chunk)
        yield buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
    if buffer.tell():
        yield buffer.getvalue()


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
