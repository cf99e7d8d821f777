"""What the capture commands share: finding one request's legs in the files named."""

from __future__ import annotations

from django.core.management.base import CommandError

from usage.capture.format import Exchange, NotACapture, read_file


def request_exchanges(paths: list[str], request_id: str) -> list[Exchange]:
    """Every leg of `request_id` in the files, client leg first; CommandError when none."""
    found: list[Exchange] = []
    for name in paths:
        try:
            capture = read_file(name)
        except FileNotFoundError:
            raise CommandError(f"{name}: no such file") from None
        except (NotACapture, OSError) as exc:
            raise CommandError(str(exc)) from None
        found.extend(e for e in capture.exchanges if e.request_id == request_id)
    if not found:
        raise CommandError(
            f"request {request_id} is not in {', '.join(paths)}: list what the files hold "
            "with `manage.py capture_inspect FILE...`"
        )
    return sorted(found, key=lambda e: (e.leg != "client", e.attempt))
