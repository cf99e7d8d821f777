"""What the capture commands share: finding one request's legs in the files named."""

from __future__ import annotations

from pathlib import Path

from django.core.management.base import CommandError

from usage.capture.format import CaptureFile, Exchange, NotACapture, capture_files, iter_file


def request_exchanges(paths: list[str], request_id: str) -> list[Exchange]:
    """Every leg of `request_id` in the files (a folder: every capture file in it), client leg
    first; CommandError when none. Only that request's exchanges are kept while reading."""
    found: list[Exchange] = []
    files: list[Path] = []
    for name in paths:
        path = Path(name)
        files.extend(capture_files(path) if path.is_dir() else [path])
    for path in files:
        try:
            found.extend(
                e
                for e in iter_file(CaptureFile(path=path, header={}))
                if e.request_id == request_id
            )
        except FileNotFoundError:
            raise CommandError(f"{path}: no such file") from None
        except (NotACapture, OSError) as exc:
            raise CommandError(str(exc)) from None
    if not found:
        raise CommandError(
            f"request {request_id} is not in {', '.join(paths)}: list what the files hold "
            "with `manage.py capture_inspect FILE...`"
        )
    return sorted(found, key=lambda e: (e.leg != "client", e.attempt))
