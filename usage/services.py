"""Writes of the usage app other than recording: retention."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import models, transaction
from django.utils import timezone

from common.timeframes import HOUR, floor_time
from usage.models import CallRecord, MinuteRollup

logger = logging.getLogger(__name__)

PRUNE_BATCH = 10_000


@dataclass(slots=True)
class PruneResult:
    cutoff: datetime | None
    records: int = 0
    minute_rollups: int = 0


def usage_prune(
    *,
    older_than: timedelta | None = None,
    now: datetime | None = None,
    batch_size: int = PRUNE_BATCH,
    progress: Callable[[int], None] | None = None,
) -> PruneResult:
    """Delete call records that started before now - `older_than` (default:
    LLMROTATE_USAGE_RETENTION_DAYS; 0 days there means keep forever), and minute rollups of
    the whole hours before that.

    Hourly and daily rollups are kept: analytics over old periods stay available after the
    raw records are gone, at a few hundred rows per hour. Records go in batches of
    `batch_size` rows, each its own short transaction, so the recorder's writes interleave and
    a huge first prune neither locks the table for long nor bloats one transaction.

    Minute rows go one whole hour per transaction, oldest hour first (batched within the hour
    if it is large): reads take every hour from the oldest minute row on as complete
    (usage.rollup_reads.minute_rollups_from) and answer older edges from hour rows. A batch
    that cut through an hour would, until the next one committed (or for good, if the prune
    died there), leave a partial hour that reads as whole and undercounts.

    `progress` gets the running count of deleted rows, after each commit. The scheduled job
    calls this.
    """
    if older_than is None:
        days = settings.LLMROTATE_USAGE_RETENTION_DAYS
        if days <= 0:
            return PruneResult(cutoff=None)
        older_than = timedelta(days=days)
    cutoff = (now or timezone.now()) - older_than
    result = PruneResult(cutoff=cutoff)
    deleted = 0

    def committed(count: int) -> None:
        nonlocal deleted
        deleted += count
        if progress:
            progress(deleted)

    while True:
        with transaction.atomic():
            count = _delete_batch(CallRecord, "started_at", before=cutoff, size=batch_size)
        if not count:
            break
        result.records += count
        committed(count)

    horizon = floor_time(cutoff, HOUR)
    oldest = MinuteRollup.objects.filter(bucket_start__lt=horizon).order_by("bucket_start")
    while (start := oldest.values_list("bucket_start", flat=True).first()) is not None:
        hour_end = floor_time(start, HOUR) + timedelta(seconds=HOUR)
        count = 0
        with transaction.atomic():
            while batch := _delete_batch(
                MinuteRollup, "bucket_start", before=hour_end, size=batch_size
            ):
                count += batch
        result.minute_rollups += count
        committed(count)

    logger.info(
        "pruned %d call records and %d minute rollups older than %s",
        result.records,
        result.minute_rollups,
        cutoff.isoformat(),
    )
    return result


def _delete_batch(model: type[models.Model], field: str, *, before: datetime, size: int) -> int:
    # Oldest first by an indexed column; the ids, then a delete by primary key.
    ids = list(
        model._default_manager.filter(**{f"{field}__lt": before})
        .order_by(field)
        .values_list("pk", flat=True)[:size]
    )
    if ids:
        model._default_manager.filter(pk__in=ids).delete()
    return len(ids)
