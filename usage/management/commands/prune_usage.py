"""Apply usage retention from the shell (the scheduled task does the same)."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from common.timeframes import TimeFrameError, parse_duration
from usage.management.commands._progress import Progress
from usage.services import PRUNE_BATCH, usage_prune


class Command(BaseCommand):
    help = (
        "Delete call records older than --older-than (default: LLMROTATE_USAGE_RETENTION_DAYS) "
        "and minute rollups of the whole hours before that, in batches. Hourly and daily "
        "rollups are kept."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--older-than", help="e.g. 90d, 12h (default: the setting)")
        parser.add_argument("--batch-size", type=int, default=PRUNE_BATCH)
        parser.add_argument(
            "--progress", action="store_true", help="print progress even when not on a terminal"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        # One now for the bound check and the cutoff: the duration is valid for this cutoff.
        now = timezone.now()
        older_than = None
        if options["older_than"]:
            try:
                older_than = parse_duration(options["older_than"], param="--older-than", now=now)
            except TimeFrameError as exc:
                raise CommandError(exc.message) from None
        elif settings.LLMROTATE_USAGE_RETENTION_DAYS <= 0:
            self.stdout.write("LLMROTATE_USAGE_RETENTION_DAYS is 0: keeping everything.")
            return
        progress = Progress("deleted", force=options["progress"])
        result = usage_prune(
            older_than=older_than,
            now=now,
            batch_size=options["batch_size"],
            progress=progress.update,
        )
        progress.finish(result.records + result.minute_rollups)
        assert result.cutoff is not None
        self.stdout.write(
            f"deleted {result.records:,} call records and {result.minute_rollups:,} minute "
            f"rollups older than {result.cutoff:%Y-%m-%d %H:%M:%S} UTC"
        )
