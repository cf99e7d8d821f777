"""Celery tasks of the usage app: thin adapters over usage.services."""

from __future__ import annotations

from celery import shared_task

from usage import services


@shared_task(name="usage.usage_prune", ignore_result=True)
def usage_prune() -> int:
    """Apply LLMROTATE_USAGE_RETENTION_DAYS; returns the number of rows deleted."""
    result = services.usage_prune()
    return result.records + result.minute_rollups
