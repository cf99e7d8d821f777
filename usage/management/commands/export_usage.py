"""Export call records as CSV, JSON Lines or JSON: the shell side of /api/usage/export."""

from __future__ import annotations

import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from common.timeframes import WINDOWS, TimeFrameError, timeframe_parse
from usage.export import FORMATS, usage_export
from usage.filters import UsageFilters
from usage.management.commands._progress import Progress
from usage.record_selectors import usage_export_total


class Command(BaseCommand):
    help = "Export call records (oldest first) with the filters of /api/usage/export."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--format", choices=FORMATS, default="csv")
        parser.add_argument("--window", choices=list(WINDOWS))
        parser.add_argument("--since", help="ISO 8601 start (inclusive)")
        parser.add_argument("--until", help="ISO 8601 end (exclusive)")
        parser.add_argument("--provider")
        parser.add_argument("--model", help="requested model (route)")
        parser.add_argument("--key", help="upstream key id")
        parser.add_argument("--client", help="client (token) name")
        parser.add_argument("--status", choices=["success", "error"])
        parser.add_argument("--stream", choices=["true", "false"])
        parser.add_argument("--upstream-model", help="the model called upstream")
        parser.add_argument(
            "--http-status", type=int, help="requests whose client got this status (100-599)"
        )
        parser.add_argument("--session-id", help="records of this session")
        parser.add_argument("--user-agent", help="records with this User-Agent")
        parser.add_argument("--origin", help="records with this Origin (scheme://host[:port])")
        parser.add_argument("--output", "-o", help="file to write (default: stdout)")

    def handle(self, *args: Any, **options: Any) -> None:
        now = timezone.now()
        try:
            frame = timeframe_parse(
                window=options["window"], since=options["since"], until=options["until"], now=now
            )
        except TimeFrameError as exc:
            raise CommandError(exc.message) from None
        stream = options["stream"]
        status_code = options["http_status"]
        if status_code is not None and not 100 <= status_code <= 599:
            raise CommandError(f"--http-status must be 100-599, got {status_code}")
        filters = UsageFilters(
            provider=options["provider"],
            model=options["model"],
            key=options["key"],
            client=options["client"],
            status=options["status"],
            stream=None if stream is None else stream == "true",
            upstream_model=options["upstream_model"],
            client_status=status_code,
            session_id=options["session_id"],
            user_agent=options["user_agent"],
            origin=options["origin"],
        )
        progress = Progress("exported")
        if progress.enabled:  # a percentage and an ETA on a terminal; no extra queries in a pipe
            progress.total = usage_export_total(frame=frame, filters=filters, now=now)
        rows = 0

        def count(n: int) -> None:
            nonlocal rows
            rows = n
            progress.update(n)

        chunks = usage_export(frame=frame, filters=filters, fmt=options["format"], on_rows=count)
        path = options["output"]
        # Text goes straight to the file (or stdout), never through self.stdout's line endings.
        out = open(path, "w", encoding="utf-8", newline="") if path else sys.stdout  # noqa: SIM115
        try:
            for chunk in chunks:
                out.write(chunk)
            out.flush()
        finally:
            if path:
                out.close()
        progress.finish(rows)
        if path:
            self.stderr.write(f"exported {rows:,} records to {path}")
