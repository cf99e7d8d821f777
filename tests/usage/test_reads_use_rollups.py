"""The aggregate endpoints answer from rollups: not one query touches the call records table,
whatever the frame or filter (that is what keeps them fast at tens of millions of records)."""

from __future__ import annotations

from datetime import datetime, timedelta
from urllib.parse import quote

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from tests.usage import monitoring
from tests.usage.monitoring import call, write_calls

# Fixtures shared by the monitoring API tests.
api = monitoring.api
monitor_token = monitoring.monitor_token
now = monitoring.now

pytestmark = pytest.mark.django_db

AGGREGATES = [
    "/api/usage", "/api/usage/models", "/api/usage/stats", "/api/usage/clients",
    "/api/usage/timeseries", "/api/usage/reconciliation", "/api/usage/models?by=upstream_model",
]  # fmt: skip


@pytest.mark.parametrize("path", AGGREGATES)
@pytest.mark.parametrize(
    "query",
    ["", "window=24h", "window=30d&client=web&status=error", "bucket=5m&stream=true",
     "since=2020-01-01T10:17:31Z&until={recent}&model=gpt-4o-mini&key=openai-1",
     "window=7d&http_status=200&upstream_model=gpt-4o-mini"],
)  # fmt: skip
def test_it_never_reads_the_call_records(api: Client, now: datetime, path: str, query: str) -> None:
    write_calls([call(started_at=now - timedelta(minutes=m), client="web") for m in (1, 90)])
    query = query.format(recent=quote((now - timedelta(minutes=7, seconds=3)).isoformat()))
    with CaptureQueriesContext(connection) as queries:
        response = api.get(f"{path}{'&' if '?' in path else '?'}{query}")
    assert response.status_code == 200, response.content
    assert any("usage_rollup" in q["sql"] for q in queries)
    assert not [q["sql"] for q in queries if "usage_callrecord" in q["sql"]]
