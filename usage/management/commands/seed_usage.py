"""Seed realistic call records through the production write path (see usage/seeding.py)."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from usage.management.commands._progress import Progress
from usage.seeding import usage_seed


def _shard(value: str) -> tuple[int, int]:
    try:
        index, count = (int(part) for part in value.split("/"))
    except ValueError:
        raise ValueError("expected K/N, e.g. 1/2") from None
    if not 1 <= index <= count:
        raise ValueError("K must be between 1 and N")
    return index - 1, count


class Command(BaseCommand):
    help = (
        "Write N synthetic call records (and their rollups) over the last D days: several "
        "providers, keys, models and clients, every kind of error, streams, a diurnal shape."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--records", type=int, default=100_000)
        parser.add_argument("--days", type=float, default=30)
        parser.add_argument("--end", type=datetime.fromisoformat, help="ISO 8601; default now")
        parser.add_argument("--batch-size", type=int, default=10_000)
        parser.add_argument("--seed", type=int, default=1, help="random seed (reproducible)")
        parser.add_argument(
            "--shard",
            type=_shard,
            default=(0, 1),
            help="K/N: write only the K-th of N time slices (run N processes in parallel)",
        )
        parser.add_argument(
            "--progress", action="store_true", help="print progress even when not on a terminal"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["records"] < 0 or options["days"] <= 0:
            raise CommandError("--records must be ≥ 0 and --days > 0")
        index, count = options["shard"]
        expected = options["records"] // count
        progress = Progress("seeding", total=expected, force=options["progress"])
        started = time.monotonic()
        written = usage_seed(
            records=options["records"],
            days=options["days"],
            end=options["end"],
            batch_size=options["batch_size"],
            seed=options["seed"],
            shard=(index, count),
            progress=progress.update,
        )
        progress.finish(written)
        elapsed = time.monotonic() - started
        self.stdout.write(
            f"seeded {written:,} call records in {elapsed:,.1f}s "
            f"({written / max(elapsed, 1e-9):,.0f}/s)"
        )
