"""Celery tasks of the usage app: thin adapters over usage.services."""

from __future__ import annotations

from celery import shared_task

from usage import services
from usage.capture.writer import get_capture_writer


@shared_task(name="usage.usage_prune", ignore_result=True)
def usage_prune() -> int:
    """Apply LLMROTATE_USAGE_RETENTION_DAYS; returns the number of rows deleted. Capture files
    past their retention age or size cap go too: a gateway that captures nothing any more
    would otherwise never prune what it captured before."""
    get_capture_writer().prune()
    result = services.usage_prune()
    return result.records + result.minute_rollups
