"""Epoch seconds to datetimes, for showing timers that partly come from upstreams.

A key's cooldown ends when an upstream's `Retry-After` said; a hostile or broken one can say
"in 3e11 seconds", past the year 9999 that `datetime` can hold. Timers are clamped when set
(keys.health), but a view must not fail on one stored before that, or by a bug: each shows as
the latest moment a datetime can be instead.
"""

from __future__ import annotations

from datetime import UTC, datetime

_LATEST = datetime.max.replace(tzinfo=UTC)
_EARLIEST = datetime.min.replace(tzinfo=UTC)


def datetime_from_epoch(epoch: float | None) -> datetime | None:
    """The UTC datetime of `epoch` (None for None or 0, which mean "no timer")."""
    if not epoch:
        return None
    try:
        return datetime.fromtimestamp(epoch, UTC)
    except (OverflowError, OSError, ValueError):
        return _LATEST if epoch > 0 else _EARLIEST
