"""Export one captured request as a HAR file (browser devtools, Charles, Fiddler, har tools)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from usage.capture.har import har_dumps, har_log
from usage.management.commands._capture import request_exchanges

FORMATS = ("har",)


class Command(BaseCommand):
    help = "Write the captured legs of one request as a HAR 1.2 file (0600: it holds prompts)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("files", nargs="+", metavar="FILE", help="capture files")
        parser.add_argument("--request-id", required=True)
        parser.add_argument("--format", choices=FORMATS, default="har")
        parser.add_argument(
            "--output", "-o", help="file to write (default: <request id>.har here; - = stdout)"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        request_id = options["request_id"]
        exchanges = request_exchanges(options["files"], request_id)
        text = har_dumps(har_log(exchanges))
        output = options["output"] or f"{_safe_name(request_id)}.har"
        if output == "-":
            self.stdout.write(text, ending="")
            self.stdout.flush()
            return
        path = Path(output)
        _write_private(path, text.encode("utf-8"))
        self.stderr.write(f"wrote {len(exchanges)} entries of request {request_id} to {path}")


def _safe_name(request_id: str) -> str:
    # A request id comes from a header a client may set: never let it name a path elsewhere.
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in request_id).lstrip(".")


def _write_private(path: Path, data: bytes) -> None:
    """The file holds prompts and answers: created 0600, and an existing file (emptied on
    opening) is made 0600 before anything is written to it."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError as exc:
        raise CommandError(f"cannot write {path}: {exc.strerror}") from None
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
