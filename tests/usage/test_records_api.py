"""/api/usage/recent (keyset pages), /api/events and /api/requests/{request_id}."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from tests.usage import monitoring
from tests.usage.monitoring import call, write_calls
from usage.models import Outcome

# Fixtures shared by the monitoring API tests.
api = monitoring.api
monitor_token = monitoring.monitor_token
now = monitoring.now

pytestmark = pytest.mark.django_db


def test_recent_pages_walk_every_record_once_newest_first(api: Client, now: datetime) -> None:
    # Ties on started_at are broken by id, so equal timestamps never repeat or vanish.
    same = now - timedelta(minutes=1)
    write_calls([call(started_at=same if i % 3 else now - timedelta(seconds=i)) for i in range(25)])
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        query = "/api/usage/recent?limit=7" + (f"&cursor={cursor}" if cursor else "")
        body = api.get(query).json()
        seen += [r["request_id"] for r in body["records"]]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert pages == 4
    assert len(seen) == len(set(seen)) == 25
    times = [r["started_at"] for r in api.get("/api/usage/recent?limit=25").json()["records"]]
    assert times == sorted(times, reverse=True)


def test_recent_applies_filters_and_frames(api: Client, now: datetime) -> None:
    write_calls(
        [
            call(started_at=now, client="a"),
            call(started_at=now, client="b", outcome=Outcome.TIMEOUT),
            call(started_at=now - timedelta(days=2), client="a"),
        ]
    )
    assert len(api.get("/api/usage/recent?client=a").json()["records"]) == 2
    assert len(api.get("/api/usage/recent?client=a&window=24h").json()["records"]) == 1
    errors = api.get("/api/usage/recent?status=error").json()["records"]
    assert [r["outcome"] for r in errors] == ["timeout"]


def test_a_page_costs_one_query_whatever_its_depth(api: Client, now: datetime) -> None:
    write_calls([call(started_at=now - timedelta(seconds=i)) for i in range(30)])
    cursor = api.get("/api/usage/recent?limit=20").json()["next_cursor"]
    with CaptureQueriesContext(connection) as queries:
        page = api.get(f"/api/usage/recent?limit=5&cursor={cursor}").json()
    assert len(page["records"]) == 5
    record_queries = [q for q in queries if "usage_callrecord" in q["sql"]]
    assert len(record_queries) == 1
    assert "OFFSET" not in record_queries[0]["sql"].upper()


@pytest.mark.parametrize("cursor", ["garbage", "bm90LWEtY3Vyc29y", "%%%"])
def test_a_foreign_cursor_gets_422(api: Client, cursor: str) -> None:
    response = api.get(f"/api/usage/recent?cursor={cursor}")
    assert response.status_code == 422
    assert "cursor" in response.json()["error"]["message"]


def test_limit_is_bounded(api: Client) -> None:
    assert api.get("/api/usage/recent?limit=0").status_code == 422
    assert api.get("/api/usage/recent?limit=1001").status_code == 422


def test_events_are_the_most_recent_records_newest_last(api: Client, now: datetime) -> None:
    write_calls([call(request_id=f"e{i}", started_at=now - timedelta(minutes=i)) for i in range(5)])
    events = api.get("/api/events?limit=3").json()["events"]
    assert [e["request_id"] for e in events] == ["e2", "e1", "e0"]


def test_a_request_shows_its_failover_path(api: Client, now: datetime) -> None:
    write_calls(
        [
            call(request_id="r1", attempt=1, started_at=now, provider="openai", key_id="o-1",
                 outcome=Outcome.RATE_LIMITED, status_code=429),
            call(request_id="r1", attempt=2, started_at=now + timedelta(milliseconds=80),
                 provider="openai", key_id="o-2", outcome=Outcome.UPSTREAM_ERROR, status_code=503),
            call(request_id="r1", attempt=3, started_at=now + timedelta(milliseconds=200),
                 provider="azure", key_id="az-1", upstream_model="gpt-4o-mini-eu"),
            call(request_id="other", started_at=now),
        ]
    )  # fmt: skip
    body = api.get("/api/requests/r1").json()
    assert [a["attempt"] for a in body["attempts"]] == [1, 2, 3]
    assert body["path"] == [
        "openai/o-1 (gpt-4o-mini): rate_limited",
        "openai/o-2 (gpt-4o-mini): upstream_error",
        "azure/az-1 (gpt-4o-mini-eu): success",
    ]
    assert body["final_outcome"] == "success"


def test_an_unknown_request_is_404(api: Client) -> None:
    response = api.get("/api/requests/nope")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
