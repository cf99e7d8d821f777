"""List captured exchanges, and with --detect-issues the problems each response shows.

Exit status: 0, also when issues were found (an inspection is a report, not a verdict);
with --fail-on-issues, 1 when any exchange has an issue (notes such as `truncated` and
`client_disconnected` do not count), for CI. A file that is not a capture file stops the
command (CommandError, status 1); a torn tail (a crash while writing) is reported and the
exchanges before it are inspected.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from usage.capture.format import CaptureFile, Exchange, NotACapture, capture_files, iter_file
from usage.capture.inspect import (
    DEFAULT_GAP_MS,
    Issue,
    Tolerance,
    detect_issues,
    exchange_row,
    summarize,
    tolerance_parse,
)
from usage.management.commands._progress import Progress

COLUMNS = (
    ("time", "TIME"),
    ("request_id", "REQUEST"),
    ("leg", "LEG"),
    ("attempt", "ATT"),
    ("route", "ROUTE"),
    ("key", "KEY"),
    ("status", "STATUS"),
    ("duration_ms", "MS"),
    ("size", "BYTES"),
    ("stream", "STREAM"),
    ("end", "END"),
)
# Numbers read best right-aligned.
_RIGHT = frozenset({"attempt", "status", "duration_ms", "size"})


class Command(BaseCommand):
    help = (
        "List the exchanges in capture files (or folders of them); --detect-issues reports"
        " the problems of each response (docs/capture.md, 'Inspecting captures')."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("paths", nargs="+", metavar="FILE", help="capture files or folders")
        parser.add_argument("--detect-issues", action="store_true", help="check each response")
        parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
        parser.add_argument("--request-id", help="only this request's exchanges")
        parser.add_argument(
            "--gap-ms",
            type=float,
            default=DEFAULT_GAP_MS,
            help=f"chunk_gap above this many ms between chunks (default {DEFAULT_GAP_MS:g})",
        )
        parser.add_argument(
            "--usage-tolerance",
            default=str(Tolerance()),
            help="usage_mismatch beyond max(TOKENS, PERCENT%% of the counted), as TOKENS,PERCENT%%"
            f" (default {Tolerance()})",
        )
        parser.add_argument(
            "--fail-on-issues",
            action="store_true",
            help="exit 1 when an exchange has an issue (implies --detect-issues)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            tolerance = tolerance_parse(options["usage_tolerance"])
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        if options["gap_ms"] < 0:
            raise CommandError(f"--gap-ms must not be negative, got {options['gap_ms']:g}")
        detect = options["detect_issues"] or options["fail_on_issues"]
        wanted = options["request_id"]
        # One exchange at a time: only its row and issues are kept, so a folder of a gigabyte
        # of captures is inspected in the memory of its largest exchange.
        files: list[CaptureFile] = []
        rows: list[dict[str, Any]] = []
        found: list[list[Issue]] = []
        progress = Progress("inspecting", total=None) if detect else None
        for capture in self._files(options["paths"]):
            files.append(capture)
            for exchange in self._exchanges(capture):
                if wanted is not None and exchange.request_id != wanted:
                    continue
                rows.append(exchange_row(exchange))
                if detect:
                    found.append(
                        detect_issues(exchange, gap_ms=options["gap_ms"], tolerance=tolerance)
                    )
                    if progress:
                        progress.update(len(found))
        if progress:
            progress.finish(len(found))
        # A request's legs together, the client's first: the writer appends each leg as it
        # ends, so an attempt lands in the file before the client leg it answered.
        order = sorted(
            range(len(rows)),
            key=lambda i: (
                rows[i]["time"],
                rows[i]["request_id"],
                rows[i]["leg"] != "client",
                rows[i]["attempt"],
            ),
        )
        rows = [rows[i] for i in order]
        found = [found[i] for i in order] if detect else found
        summary = summarize(found) if detect else {"exchanges": len(rows)}
        if options["json"]:
            self._write_json(files, rows, found if detect else None, summary)
        else:
            self._write_text(files, rows, found if detect else None, summary)
        if options["fail_on_issues"] and summary["with_issues"]:
            sys.exit(1)

    def _exchanges(self, capture: CaptureFile) -> Iterator[Exchange]:
        try:
            for exchange in iter_file(capture):
                capture.exchanges_read += 1
                yield exchange
        except NotACapture as exc:
            raise CommandError(str(exc)) from None
        except OSError as exc:
            raise CommandError(f"{capture.path}: cannot read ({exc.strerror or exc})") from None

    def _files(self, paths: list[str]) -> list[CaptureFile]:
        """Every capture file named (not read yet), a folder's capture files in order."""
        files: list[CaptureFile] = []
        for name in paths:
            path = Path(name)
            if path.is_dir():
                listed = capture_files(path)
                if not listed:
                    raise CommandError(f"{path}: a folder without capture files")
            elif path.exists():
                listed = [path]
            else:
                raise CommandError(f"{path}: no such file or folder")
            files.extend(CaptureFile(path=each, header={}) for each in listed)
        return files

    def _write_json(
        self,
        files: list[CaptureFile],
        rows: list[dict[str, Any]],
        found: list[list[Issue]] | None,
        summary: dict[str, Any],
    ) -> None:
        if found is not None:
            for row, issues in zip(rows, found, strict=True):
                row["issues"] = [issue.as_dict() for issue in issues]
        document = {
            "files": [
                {"path": str(f.path), "exchanges": f.exchanges_read, "problem": f.problem}
                for f in files
            ],
            "exchanges": rows,
            "summary": summary,
        }
        self.stdout.write(json.dumps(document, indent=2, default=str))

    def _write_text(
        self,
        files: list[CaptureFile],
        rows: list[dict[str, Any]],
        found: list[list[Issue]] | None,
        summary: dict[str, Any],
    ) -> None:
        for f in files:
            if f.problem:
                self.stderr.write(f"{f.path}: {f.problem}; the exchanges before it are listed")
        cells = [[_cell(row[name]) for name, _ in COLUMNS] for row in rows]
        widths = [
            max([len(title), *(len(row[c]) for row in cells)])
            for c, (_, title) in enumerate(COLUMNS)
        ]

        def line(values: list[str]) -> str:
            return "  ".join(
                v.rjust(w) if COLUMNS[c][0] in _RIGHT else v.ljust(w)
                for c, (v, w) in enumerate(zip(values, widths, strict=True))
            ).rstrip()

        self.stdout.write(line([title for _, title in COLUMNS]))
        for i, row in enumerate(cells):
            self.stdout.write(line(row))
            for issue in found[i] if found is not None else ():
                mark = "note" if issue.info else "issue"
                self.stdout.write(f"    {mark} {issue.code}: {issue.message}")
        total = summary["exchanges"]
        text = f"{total} exchange{'s' if total != 1 else ''} in {len(files)} file(s)"
        if found is not None:
            text += f", {summary['with_issues']} with issues"
            if summary["by_code"]:
                text += ": " + ", ".join(f"{c} {n}" for c, n in summary["by_code"].items())
        self.stdout.write(text)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)
