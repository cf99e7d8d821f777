"""Reads the dashboard needs that the apps' selectors do not offer in that shape yet. Each is a
thin composition of public selectors, not a query of its own, so the figures stay the API's.
When the apps grow the selector, the adapter goes.
"""

from __future__ import annotations

from datetime import datetime

from healthchecks.models import Endpoint, HealthEvent
from healthchecks.notify import public_url
from healthchecks.selectors import health_events_recent
from usage import selectors
from usage.rollups import ADDITIVE_COLUMNS
from usage.selectors import Stats, UsageFilters
from usage.timeframes import TimeFrame


def usage_stats_by_key(*, frame: TimeFrame, now: datetime) -> dict[str, Stats]:
    """`usage_stats` per upstream key, in one pass over the rollups.

    usage.selectors offers the per-client variant only (`usage_stats_by_client`); this is the
    same call with `key_id` as the group. It uses that module's `_merge` and `_stats` rather
    than asking `usage_stats` once per key (eleven keys made the keys page eleven times
    slower). To go once usage.selectors has a public `usage_stats_by(group=...)`.
    """
    merged = selectors._merge(
        frame, now=now, filters=UsageFilters(), group=("key_id",), columns=ADDITIVE_COLUMNS,
        extremes=True,
    )  # fmt: skip
    return {key[0]: selectors._stats(row) for key, row in merged.items()}


def health_events_by_endpoint(*, limit: int) -> dict[str, list[HealthEvent]]:
    """The last `limit` probe results of every endpoint, newest first, keyed like
    `endpoint_health_list()` keys its entries (the public URL)."""
    return {
        public_url(endpoint.base_url): health_events_recent(endpoint=endpoint, limit=limit)
        for endpoint in Endpoint.objects.all()
    }
