"""Reads of raw call records: recent records, one request's attempts, and exports.

Every query here walks an index in (started_at, id) order (or request_id), never a full scan:
pages and export chunks continue from the last row seen (keyset pagination) rather than with
OFFSET, so page 1000 costs what page 1 costs and an export never holds more than a chunk.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from django.db.models import Min, Q, QuerySet

from common.timeframes import EARLIEST, LATEST, TimeFrame, TimeFrameError, ceil_time, floor_time
from usage.filters import UsageFilters
from usage.models import CallRecord, Outcome
from usage.selectors import usage_totals_by

# What a record looks like outside: every persisted column except the surrogate id.
RECORD_FIELDS: tuple[str, ...] = tuple(
    f.attname for f in CallRecord._meta.concrete_fields if not f.primary_key
)
EXPORT_CHUNK = 5000


@dataclass(frozen=True, slots=True)
class RecordPage:
    records: list[dict[str, Any]]
    next_cursor: str | None


def _filtered(*, frame: TimeFrame, filters: UsageFilters) -> QuerySet[CallRecord]:
    q = Q(**filters.record_equalities())
    if filters.status == "success":
        q &= Q(outcome=Outcome.SUCCESS)
    elif filters.status == "error":
        q &= ~Q(outcome=Outcome.SUCCESS)
    return CallRecord.objects.filter(q & records_in_frame(frame))


def records_in_frame(frame: TimeFrame) -> Q:
    """Records that started within `frame`."""
    q = Q()
    if frame.since is not None:
        q &= Q(started_at__gte=frame.since)
    if frame.until is not None:
        q &= Q(started_at__lt=frame.until)
    return q


def record_conditions(*, frame: TimeFrame, filters: UsageFilters) -> tuple[list[str], list[Any]]:
    """The same selection as `_filtered`, as SQL conditions and parameters (for COPY)."""
    equal = filters.record_equalities()
    conditions = [f"{column} = %s" for column in equal]
    params: list[Any] = list(equal.values())
    if filters.status is not None:
        conditions.append("outcome = %s" if filters.status == "success" else "outcome <> %s")
        params.append(Outcome.SUCCESS.value)
    if frame.since is not None:
        conditions.append("started_at >= %s")
        params.append(frame.since)
    if frame.until is not None:
        conditions.append("started_at < %s")
        params.append(frame.until)
    return conditions, params


def records_after(started_at: datetime, pk: int, *, newer: bool) -> Q:
    """Rows strictly after (started_at, id) in the walk's direction. Spelled out with a plain
    bound on started_at first, so that any (x, started_at) index can serve it."""
    if newer:
        return Q(started_at__gte=started_at) & (Q(started_at__gt=started_at) | Q(id__gt=pk))
    return Q(started_at__lte=started_at) & (Q(started_at__lt=started_at) | Q(id__lt=pk))


def encode_cursor(started_at: datetime, pk: int) -> str:
    raw = f"{started_at.isoformat()}|{pk}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, int]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        moment, pk = base64.urlsafe_b64decode(padded.encode()).decode().split("|")
        started_at = datetime.fromisoformat(moment)
        if started_at.tzinfo is None:
            started_at = started_at.replace(tzinfo=UTC)
        # Out of range, these would fail in the database (bigint) or its adapter (year 1 with
        # an offset), not as a bad cursor.
        if not (EARLIEST <= started_at <= LATEST and 0 < int(pk) < 2**63):
            raise ValueError(cursor)
        return started_at, int(pk)
    except (ValueError, OverflowError, binascii.Error, UnicodeDecodeError):
        raise TimeFrameError(
            "cursor", "cursor: not a cursor from this API; pass next_cursor unchanged."
        ) from None


def usage_recent_page(
    *, frame: TimeFrame, filters: UsageFilters, limit: int, cursor: str | None = None
) -> RecordPage:
    """Newest first, `limit` records after `cursor` (None: from the newest)."""
    qs = _filtered(frame=frame, filters=filters)
    if cursor:
        started_at, pk = decode_cursor(cursor)
        qs = qs.filter(records_after(started_at, pk, newer=False))
    rows = list(qs.order_by("-started_at", "-id").values("id", *RECORD_FIELDS)[: limit + 1])
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = encode_cursor(rows[-1]["started_at"], rows[-1]["id"]) if more else None
    for row in rows:
        del row["id"]
    return RecordPage(records=rows, next_cursor=next_cursor)


def usage_events(*, frame: TimeFrame, filters: UsageFilters, limit: int) -> list[dict[str, Any]]:
    """The `limit` most recent records, newest last (llm-rotate's /api/events order)."""
    page = usage_recent_page(frame=frame, filters=filters, limit=limit)
    return page.records[::-1]


def request_attempts(*, request_id: str) -> list[dict[str, Any]]:
    """Every attempt of one client request, in order: its failover path."""
    qs = CallRecord.objects.filter(request_id=request_id).order_by("attempt", "started_at", "id")
    return list(qs.values(*RECORD_FIELDS))


def usage_export_rows(
    *, frame: TimeFrame, filters: UsageFilters, chunk_size: int | None = None
) -> Iterator[list[tuple[Any, ...]]]:
    """Matching records oldest first, as chunks of value tuples in RECORD_FIELDS order.

    Each chunk is its own indexed query continuing after the previous one, so memory stays at
    one chunk and no transaction or server-side cursor is held open between chunks (an export
    may take minutes; a long transaction would hold back Postgres' vacuum all that time).
    """
    chunk_size = chunk_size or EXPORT_CHUNK
    base = _filtered(frame=frame, filters=filters).order_by("started_at", "id")
    last: tuple[datetime, int] | None = None
    while True:
        qs = base if last is None else base.filter(records_after(*last, newer=True))
        chunk = list(qs.values_list("id", *RECORD_FIELDS)[:chunk_size])
        if not chunk:
            return
        last = (chunk[-1][1 + RECORD_FIELDS.index("started_at")], chunk[-1][0])
        yield [row[1:] for row in chunk]
        if len(chunk) < chunk_size:
            return


def usage_export_total(*, frame: TimeFrame, filters: UsageFilters, now: datetime) -> int:
    """How many records an export will write, for a progress bar, without counting them all.

    The whole minutes come from the rollups, which count every filter exactly (each is a
    rollup dimension; with a record-only filter the records are counted instead); the part
    minutes at the edges are counted from the records, by index.
    Rollups outlive pruned records, so the count starts at the oldest record still kept. Only
    records written meanwhile make the export differ.
    """
    if filters.record_only():
        # No rollup carries these: count the records, by their (value, started_at) index.
        return _filtered(frame=frame, filters=filters).count()
    oldest = CallRecord.objects.aggregate(oldest=Min("started_at"))["oldest"]
    if oldest is None:
        return 0
    since = max(frame.since, oldest) if frame.since else oldest
    start, stop = ceil_time(since, 60), frame.until
    edges = [TimeFrame(since=since, until=start)]
    # A frame running up to now has no right edge: the rollups hold everything written so far.
    if frame.until is not None and frame.until < now:
        stop = floor_time(frame.until, 60)
        if stop <= start:
            return _filtered(
                frame=TimeFrame(since=since, until=frame.until), filters=filters
            ).count()
        edges.append(TimeFrame(since=stop, until=frame.until))
    total = sum(_filtered(frame=edge, filters=filters).count() for edge in edges)
    rows = usage_totals_by(
        group=(), frame=TimeFrame(since=start, until=stop), filters=filters, now=now
    )
    return total + sum(totals.calls for _, totals in rows)
