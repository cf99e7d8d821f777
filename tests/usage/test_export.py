"""/api/usage/export and `manage.py export_usage`: streamed, chunk by chunk, in three formats."""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from django.core.management import call_command
from django.db import connection
from django.test import AsyncClient, Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from common.timeframes import TimeFrame
from tests.usage import monitoring
from tests.usage.monitoring import call, write_calls
from usage import record_selectors
from usage.filters import UsageFilters
from usage.models import CallRecord, Outcome
from usage.record_selectors import RECORD_FIELDS

# Fixtures shared by the monitoring API tests.
api = monitoring.api
monitor_token = monitoring.monitor_token
now = monitoring.now

pytestmark = pytest.mark.django_db


@pytest.fixture
def records(now: datetime) -> None:
    write_calls(
        [
            call(request_id="x1", started_at=now - timedelta(minutes=3), cost_usd=Decimal("0.1")),
            call(request_id="x2", started_at=now - timedelta(minutes=2), client="other",
                 outcome=Outcome.TIMEOUT, status_code=None),
            call(request_id="x3", started_at=now - timedelta(days=3)),
        ]
    )  # fmt: skip


def body(response: object) -> str:
    return b"".join(response.streaming_content).decode()  # type: ignore[attr-defined]


@pytest.mark.usefixtures("records")
def test_csv_has_a_header_and_one_line_per_record_oldest_first(api: Client) -> None:
    response = api.get("/api/usage/export?format=csv")
    assert response.streaming
    assert response["Content-Type"].startswith("text/csv")
    assert "attachment" in response["Content-Disposition"]
    rows = list(csv.DictReader(io.StringIO(body(response))))
    assert [r["request_id"] for r in rows] == ["x3", "x1", "x2"]
    assert list(rows[0]) == list(RECORD_FIELDS)
    assert rows[1]["cost_usd"] == "0.1000000000"


@pytest.mark.usefixtures("records")
def test_jsonl_and_json_carry_the_same_records(api: Client) -> None:
    lines = body(api.get("/api/usage/export?format=jsonl&window=24h")).splitlines()
    from_jsonl = [json.loads(line) for line in lines]
    from_json = json.loads(body(api.get("/api/usage/export?format=json&window=24h")))
    assert from_jsonl == from_json
    assert [r["request_id"] for r in from_json] == ["x1", "x2"]
    assert from_json[1]["status_code"] is None


def test_an_empty_json_export_is_an_empty_list(api: Client) -> None:
    assert json.loads(body(api.get("/api/usage/export?format=json"))) == []


@pytest.mark.usefixtures("records")
def test_export_takes_the_filters(api: Client) -> None:
    rows = body(api.get("/api/usage/export?format=jsonl&status=error&client=other")).splitlines()
    assert [json.loads(r)["request_id"] for r in rows] == ["x2"]
    assert api.get("/api/usage/export?format=xml").status_code == 422


@pytest.mark.embedded
def test_a_large_export_is_read_in_chunks_as_it_is_sent(
    api: Client, now: datetime, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(record_selectors, "EXPORT_CHUNK", 100)
    write_calls([call(started_at=now - timedelta(seconds=i % 50)) for i in range(1050)])
    with CaptureQueriesContext(connection) as before:
        response = api.get("/api/usage/export?format=csv")
    # Nothing is read until the body is consumed...
    assert not [q for q in before if "usage_callrecord" in q["sql"]]
    stream = iter(response.streaming_content)  # type: ignore[attr-defined]
    with CaptureQueriesContext(connection) as first:
        next(stream)
    # ...and then one chunk-sized query at a time.
    assert len([q for q in first if "usage_callrecord" in q["sql"]]) == 1
    with CaptureQueriesContext(connection) as rest:
        lines = sum(chunk.count(b"\n") for chunk in stream)
    assert len([q for q in rest if "usage_callrecord" in q["sql"]]) == 10
    assert lines == 1050 - 100  # the first chunk held the header and 100 rows


@pytest.mark.scaled
def test_on_postgres_the_export_copies_one_chunk_at_a_time(
    api: Client, now: datetime, monkeypatch: pytest.MonkeyPatch
) -> None:
    from usage import export_postgres

    monkeypatch.setattr(export_postgres, "CHUNK_ROWS", 100)
    write_calls([call(started_at=now - timedelta(seconds=i % 50)) for i in range(1050)])
    response = api.get("/api/usage/export?format=jsonl")
    stream = iter(response.streaming_content)  # type: ignore[attr-defined]
    with CaptureQueriesContext(connection) as first:
        assert next(stream).count(b"\n") == 100
    # The chunk's end is found with one LIMIT query (the COPY itself runs on the raw cursor).
    assert len(first) == 1 and "OFFSET 99 LIMIT 1" in first[0]["sql"]
    rest = list(stream)
    assert [c.count(b"\n") for c in rest] == [100] * 9 + [50]
    lines = b"".join(rest).splitlines()
    assert len({json.loads(line)["request_id"] for line in lines}) == 950


@pytest.mark.scaled
@pytest.mark.django_db(transaction=True)
def test_an_abandoned_postgres_export_leaves_a_usable_connection(
    now: datetime, monkeypatch: pytest.MonkeyPatch
) -> None:
    from usage import export_postgres
    from usage.export import usage_export

    monkeypatch.setattr(export_postgres, "CHUNK_ROWS", 1000)
    write_calls([call(started_at=now) for _ in range(3000)])
    chunks = usage_export(frame=TimeFrame(), filters=UsageFilters(), fmt="csv")
    next(chunks), next(chunks)
    chunks.close()  # what Django does when the client goes away
    assert CallRecord.objects.count() == 3000  # no COPY was left half read


def test_export_chunks_cover_ties_exactly_once(now: datetime) -> None:
    write_calls([call(request_id=f"t{i}", started_at=now) for i in range(23)])
    chunks = list(
        record_selectors.usage_export_rows(frame=TimeFrame(), filters=UsageFilters(), chunk_size=5)
    )
    ids = [row[0] for chunk in chunks for row in chunk]
    assert sorted(ids) == sorted(f"t{i}" for i in range(23))
    assert [len(c) for c in chunks] == [5, 5, 5, 5, 3]


@pytest.mark.django_db(transaction=True)
async def test_under_asgi_the_export_is_an_async_stream(
    monitor_token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from asgiref.sync import sync_to_async
    from django.db import connections

    # The request's thread must not keep its connection past the test (CONN_MAX_AGE).
    monkeypatch.setitem(connections.settings["default"], "CONN_MAX_AGE", 0)

    def write() -> None:
        write_calls([call(request_id="a1", started_at=timezone.now())])
        connections.close_all()  # asgiref's sync thread would keep it open otherwise

    await sync_to_async(write)()
    response = await AsyncClient().get(
        "/api/usage/export?format=jsonl", headers={"Authorization": f"Bearer {monitor_token}"}
    )
    assert response.status_code == 200, response.content
    assert response.is_async
    chunks = [chunk async for chunk in response.streaming_content]
    # Outside a real ASGI server the chunks were read on asgiref's shared sync thread.
    await sync_to_async(connections.close_all)()
    assert json.loads(b"".join(chunks))["request_id"] == "a1"


@pytest.mark.usefixtures("records")
def test_the_command_writes_a_file_with_the_same_filters(tmp_path: Path) -> None:
    out = tmp_path / "usage.csv"
    stderr = io.StringIO()
    call_command("export_usage", "--format=csv", "--window=24h", f"--output={out}", stderr=stderr)
    rows = list(csv.DictReader(out.open()))
    assert [r["request_id"] for r in rows] == ["x1", "x2"]
    assert "exported 2 records" in stderr.getvalue()
    assert "\r" not in stderr.getvalue()  # no progress bar when stderr is not a terminal


@pytest.mark.usefixtures("records")
def test_the_command_writes_jsonl_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    call_command("export_usage", "--format=jsonl", "--status=error")
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["request_id"] for line in lines] == ["x2"]


def test_the_command_takes_the_record_and_request_filters(
    now: datetime, capsys: pytest.CaptureFixture[str]
) -> None:
    write_calls([
        call(request_id="s1", started_at=now - timedelta(minutes=5), session_id="chat-1",
             user_agent="curl/8", final=True, client_status=200, upstream_model="gpt-4o"),
        call(request_id="s2", started_at=now - timedelta(minutes=4), session_id="chat-2",
             origin="https://app.example", final=True, client_status=502),
    ])  # fmt: skip

    def exported(*args: str) -> list[str]:
        call_command("export_usage", "--format=jsonl", *args)
        return [json.loads(line)["request_id"] for line in capsys.readouterr().out.splitlines()]

    assert exported("--session-id=chat-1") == ["s1"]
    assert exported("--user-agent=curl/8") == ["s1"]
    assert exported("--origin=https://app.example") == ["s2"]
    assert exported("--http-status=502") == ["s2"]
    assert exported("--upstream-model=gpt-4o", "--window=1h") == ["s1"]


def test_the_command_refuses_a_bad_http_status() -> None:
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="--http-status must be 100-599"):
        call_command("export_usage", "--http-status=42")


def test_the_command_refuses_a_bad_frame() -> None:
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="since must not be after until"):
        call_command("export_usage", "--since=2025-02-01", "--until=2025-01-01")


@pytest.mark.scaled
@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_postgres_copy_writes_timestamps_as_python_does(fmt: str) -> None:
    # Postgres' own text drops trailing zeros of the microseconds (".68168"); isoformat does not.
    from datetime import UTC

    from usage.export import _WRITERS
    from usage.export_postgres import export_copy

    moments = [
        datetime(2026, 12, 7, 3, 21, 13, 681680, tzinfo=UTC),
        datetime(2026, 12, 7, 3, 21, 14, tzinfo=UTC),
        datetime(2026, 12, 7, 3, 21, 15, 5, tzinfo=UTC),
    ]
    write_calls([call(request_id=f"t{i}", started_at=m) for i, m in enumerate(moments)])
    frame, filters = TimeFrame(), UsageFilters()
    copied = "".join(export_copy(frame=frame, filters=filters, fmt=fmt))
    written = "".join(
        _WRITERS[fmt](record_selectors.usage_export_rows(frame=frame, filters=filters))
    )
    assert "2026-12-07T03:21:13.681680+00:00" in copied
    assert [line.split(",")[:4] for line in copied.splitlines()] == [
        line.split(",")[:4] for line in written.splitlines()
    ]
