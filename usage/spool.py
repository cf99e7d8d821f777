"""Call records as rows (the persisted fields only), their JSON form, and the disk spool.

The JSON line is the same for the `llmrotate.usage` log and for spool files: datetimes in ISO
8601, the cost as a decimal string. The spool holds records the database could not take yet:
one fsync'd JSONL file per spill, named `calls-<UTC time>-<pid>-<seq>.jsonl`, so files from
every process sort oldest first.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import IO, Any

from django.db import models, transaction

from common import metrics
from usage.models import CallRecord

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows runs one process per data dir
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

Row = dict[str, Any]

_SPOOL_GLOB = "calls-*.jsonl"
_spool_seq = itertools.count()


# --- rows ---------------------------------------------------------------------------------

_UINT_MAX = {"PositiveSmallIntegerField": 32767, "PositiveIntegerField": 2147483647}
_COST_QUANTUM = Decimal("1e-10")  # CallRecord.cost_usd: 10 decimal places…
_COST_LIMIT = Decimal(10) ** 8  # …of 18 digits


def row_fit_to_columns(row: Row) -> Row:
    """Coerce values the database would reject, so one odd record cannot wedge every batch
    behind it in an endless retry (an over-long model name, a negative count, a NaN). Never
    raises: a value that cannot be coerced becomes the column's default."""
    for name, kind, limit, field in _columns():
        value = row.get(name)
        if value is None:
            continue
        # Values that already fit, the usual case, are left as they are (what _fit_value would
        # return for them) without a call per column.
        if kind is _KEEP:
            if type(value) is list and any("\x00" in str(item) for item in value):
                row[name] = [_without_nul(item) for item in value]  # tool_names
            continue
        if kind is str:
            # Postgres keeps no NUL in text (nor in jsonb): one would fail its whole batch.
            fits = type(value) is str and len(value) <= limit and "\x00" not in value
        elif kind is int:
            fits = type(value) is int and 0 <= value <= limit
        elif kind is bool:
            fits = type(value) is bool
        elif kind is float:
            fits = type(value) is float and math.isfinite(value)
        else:
            fits = False
        if fits:
            continue
        try:
            row[name] = _fit_value(field, value)
        except Exception:
            row[name] = None if field.null else field.get_default()
    return row


_KEEP = object()  # a column whose values _fit_value returns as they are
_Column = tuple[str, object, int, "models.Field[Any, Any]"]
_columns_cache: list[_Column] = []


def _columns() -> list[_Column]:
    """Per column of CallRecord but the id: (name, kind of value that may already fit, its
    limit, the field)."""
    if not _columns_cache:
        columns: list[_Column] = []
        for field in CallRecord._meta.concrete_fields:
            if field.primary_key:
                continue
            kind = field.get_internal_type()
            if kind == "CharField":
                columns.append((field.attname, str, field.max_length or 0, field))
            elif kind in _UINT_MAX:
                columns.append((field.attname, int, _UINT_MAX[kind], field))
            elif kind == "BooleanField":
                columns.append((field.attname, bool, 0, field))
            elif kind == "FloatField":
                columns.append((field.attname, float, 0, field))
            elif kind == "DecimalField":
                columns.append((field.attname, Decimal, 0, field))  # always quantized
            else:
                columns.append((field.attname, _KEEP, 0, field))
        _columns_cache[:] = columns
    return _columns_cache


def _without_nul(value: Any) -> str:
    return str(value).replace("\x00", "")


def _fit_value(field: models.Field[Any, Any], value: Any) -> Any:
    kind = field.get_internal_type()
    if kind == "CharField":
        return _without_nul(value)[: field.max_length]
    if kind in _UINT_MAX:
        return min(max(int(value), 0), _UINT_MAX[kind])
    if kind == "BooleanField":
        return bool(value)
    if kind == "FloatField":
        value = float(value)
        if not math.isfinite(value):
            return None if field.null else 0.0
        return value
    if kind == "DecimalField":
        value = Decimal(value)
        if not value.is_finite() or abs(value) >= _COST_LIMIT:
            return None
        return value.quantize(_COST_QUANTUM)
    return value


def _json_default(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return format(value, "f")
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


# What json.dumps(row, default=_json_default, separators=(",", ":")) builds on every call.
_ENCODER = json.JSONEncoder(default=_json_default, separators=(",", ":"))


def row_to_json(row: Row) -> str:
    return _ENCODER.encode(row)


def row_from_json(line: str, *, field_names: Sequence[str]) -> Row:
    data = json.loads(line)
    row = {name: data[name] for name in field_names if name in data}
    for name in ("started_at", "finished_at"):
        row[name] = datetime.fromisoformat(row[name])
    if row.get("cost_usd") is not None:
        row["cost_usd"] = Decimal(row["cost_usd"])
    return row


# --- spool files --------------------------------------------------------------------------


def spool_files(*, spool_dir: Path) -> list[Path]:
    # Names start with a UTC timestamp, so name order is age order across processes.
    return sorted(spool_dir.glob(_SPOOL_GLOB)) if spool_dir.is_dir() else []


def spool_write(*, spool_dir: Path, rows: Sequence[Row]) -> Path:
    """Write rows to a new spool file, durably. Raises OSError (the caller keeps the rows)."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    path = spool_dir / f"calls-{stamp}-{os.getpid()}-{next(_spool_seq):04d}.jsonl"
    tmp = path.with_suffix(".jsonl.tmp")
    spool_dir.mkdir(parents=True, exist_ok=True)
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(row_to_json(row) + "\n" for row in rows)
        f.flush()
        os.fsync(f.fileno())
    # Replayers only look at *.jsonl, so they never see a half-written file.
    os.replace(tmp, path)
    _fsync_dir(spool_dir)
    return path


def spool_replay_file(
    *,
    path: Path,
    field_names: Sequence[str],
    batch_size: int,
    write_batch: Callable[[list[CallRecord]], None],
) -> int:
    """Insert one spool file's rows in one transaction, then delete the file. Returns the
    number of rows inserted; database errors propagate (the file stays for the next try).

    Several processes may share the spool dir: an exclusive flock decides who replays a file
    (the OS releases it if that process dies), and a file that its replayer unlinked after we
    listed it is skipped. If a process died between commit and unlink, the file's first row is
    already in the table; as a file commits all-or-nothing, that means all of it is.
    """
    try:
        f = open(path, encoding="utf-8")  # noqa: SIM115 - held open for the lock
    except FileNotFoundError:
        return 0
    with f:
        if not _try_lock(f) or not _is_same_file(f, path):
            return 0
        try:
            # Fitted again: a file spooled before a rule of row_fit_to_columns existed must not
            # fail its replay for ever.
            rows = [
                row_fit_to_columns(row_from_json(line, field_names=field_names))
                for line in f
                if line.strip()
            ]
        except (ValueError, TypeError, KeyError):
            # Never delete what we cannot read: set it aside for a human.
            logger.exception("spool file %s is unreadable; renamed to .corrupt", path.name)
            aside = path.rename(path.with_suffix(".corrupt"))
            # Set aside, not written: the records-dropped alert calls for the human.
            metrics.RECORDER_DROPPED.inc(amount=_line_count(aside))
            return 0
        records = [CallRecord(**row) for row in rows]
        inserted = 0
        with transaction.atomic():
            if records and _already_committed(records[0]):
                logger.warning("spool file %s was already committed; removing it", path.name)
            else:
                for start in range(0, len(records), batch_size):
                    write_batch(records[start : start + batch_size])
                inserted = len(records)
        path.unlink()
    logger.info("replayed %d call records from %s", inserted, path.name)
    return inserted


def _line_count(path: Path) -> int:
    try:
        return sum(1 for line in path.read_bytes().splitlines() if line.strip())
    except OSError:
        return 1  # unknown, but at least one: the alert must still fire


def _already_committed(record: CallRecord) -> bool:
    return CallRecord.objects.filter(
        request_id=record.request_id, attempt=record.attempt, started_at=record.started_at
    ).exists()


def _try_lock(f: IO[str]) -> bool:
    if fcntl is None:  # pragma: no cover
        return True
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _is_same_file(f: IO[str], path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(f.fileno()), os.stat(path))
    except FileNotFoundError:
        return False


def _fsync_dir(path: Path) -> None:
    # Makes the rename durable on POSIX; Windows cannot open a directory like this.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)
