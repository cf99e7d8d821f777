"""Writes of the usage app other than recording: retention."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import models, transaction
from django.utils import timezone

from usage.models import CallRecord, MinuteRollup
from usage.timeframes import floor_time

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
    raw records are gone, at a few hundred rows per hour. Minute rows go in whole hours so
    that reads can tell where they stop (usage.selectors.minute_rollups_from) and answer
    older edges from hour rows instead of undercounting them. Deletes go in batches of
    `batch_size` rows, each its own short transaction, so the recorder's writes interleave
    and a huge first prune neither locks the table for long nor bloats one transaction.
    `progress` gets the running count of deleted rows. The scheduled job calls this.
    """
    if older_than is None:
        days = settings.LLMROTATE_USAGE_RETENTION_DAYS
        if days <= 0:
            return PruneResult(cutoff=None)
        older_than = timedelta(days=days)
    cutoff = (now or timezone.now()) - older_than
    result = PruneResult(cutoff=cutoff)
    deleted = 0

    def batches(model: type[models.Model], field: str, before: datetime) -> int:
        nonlocal deleted
        total = 0
        while True:
            # Oldest first by an indexed column; the ids, then a delete by primary key.
            ids = list(
                model._default_manager.filter(**{f"{field}__lt": before})
                .order_by(field)
                .values_list("pk", flat=True)[:batch_size]
            )
            if not ids:
                return total
            with transaction.atomic():
                model._default_manager.filter(pk__in=ids).delete()
            total += len(ids)
            deleted += len(ids)
            if progress:
                progress(deleted)

    result.records = batches(CallRecord, "started_at", cutoff)
    result.minute_rollups = batches(MinuteRollup, "bucket_start", floor_time(cutoff, 3600))
    logger.info(
        "pruned %d call records and %d minute rollups older than %s",
        result.records,
        result.minute_rollups,
        cutoff.isoformat(),
    )
    return result
