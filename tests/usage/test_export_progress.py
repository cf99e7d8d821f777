"""`manage.py export_usage` on a terminal draws a progress line with a total (so a percentage
and an ETA); piped, it writes the records and nothing else. The total comes from the rollups,
corrected at the frame's edges, and matches what the export writes."""

from __future__ import annotations

import io
import json
import re
import sys
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from django.core.management import call_command
from django.utils import timezone

from common.timeframes import TimeFrame
from tests.usage.monitoring import call, write_calls
from usage.filters import UsageFilters
from usage.models import Outcome
from usage.record_selectors import usage_export_rows, usage_export_total
from usage.services import usage_prune

pytestmark = pytest.mark.django_db


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def now() -> datetime:
    return timezone.now()


@pytest.fixture
def traffic(now: datetime) -> None:
    """Records 7 seconds apart over the last 10 minutes, so frame edges fall inside minutes,
    two clients, some errors; and some 100 days old, which retention is about to remove."""
    start = now - timedelta(minutes=10)
    write_calls(
        [call(started_at=start + timedelta(seconds=7 * i), client="ab"[i % 2],
              outcome=Outcome.TIMEOUT if i % 5 == 0 else Outcome.SUCCESS)
         for i in range(80)]
        + [call(started_at=now - timedelta(days=100, seconds=i)) for i in range(5)]
    )  # fmt: skip


def _exported(frame: TimeFrame, filters: UsageFilters) -> int:
    return sum(len(chunk) for chunk in usage_export_rows(frame=frame, filters=filters))


@pytest.mark.usefixtures("traffic")
@pytest.mark.parametrize("pruned", [False, True])
@pytest.mark.parametrize(
    ("since", "until", "filters"),
    [(None, None, UsageFilters()), (-9.5, None, UsageFilters(client="a")),
     (-8.3, -2.6, UsageFilters(status="error")), (-7.9, -7.8, UsageFilters()),
     (-300.0, -1.1, UsageFilters(client="b", status="success"))],
)  # fmt: skip
def test_the_total_is_what_the_export_writes(
    now: datetime, pruned: bool, since: float | None, until: float | None, filters: UsageFilters
) -> None:
    if pruned:  # the old records go; their hour and day rollups stay
        usage_prune(older_than=timedelta(days=90), now=now)
    frame = TimeFrame(
        since=None if since is None else now + timedelta(minutes=since),
        until=None if until is None else now + timedelta(minutes=until),
    )
    total = usage_export_total(frame=frame, filters=filters, now=now)
    assert total == _exported(frame, filters)


def test_the_total_leaves_out_records_pruned_inside_a_minute(now: datetime) -> None:
    minute = now.replace(second=0, microsecond=0) - timedelta(days=100)
    write_calls([call(started_at=minute + timedelta(seconds=s)) for s in (10, 20, 40)])
    # The cutoff falls at :30 of that minute: its rollup row still counts all three calls.
    usage_prune(older_than=timedelta(days=90), now=minute + timedelta(days=90, seconds=30))
    assert usage_export_total(frame=TimeFrame(), filters=UsageFilters(), now=now) == 1


@pytest.mark.usefixtures("traffic")
def test_on_a_terminal_it_shows_the_total_from_the_start(
    now: datetime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    since = (now - timedelta(minutes=9, seconds=25)).isoformat()
    out = tmp_path / "usage.jsonl"
    call_command("export_usage", "--format=jsonl", f"--since={since}", "--client=a",
                 f"--output={out}")  # fmt: skip
    written = len(out.read_text().splitlines())
    text = terminal.getvalue()
    assert "\r" in text
    assert f"{written}/{written} (100.0%)" in text and "ETA" in text
    # Every redraw showed the same total: it was known before the first row was read.
    assert set(re.findall(r"/(\d+) \(", text)) == {str(written)}


@pytest.mark.usefixtures("traffic")
def test_piped_it_writes_the_records_and_nothing_else(
    capsys: pytest.CaptureFixture[str],
) -> None:
    call_command("export_usage", "--format=jsonl", "--window=1h", "--status=error")
    captured = capsys.readouterr()
    assert captured.err == ""
    lines = captured.out.splitlines()
    assert len(lines) == 16
    assert {json.loads(line)["outcome"] for line in lines} == {"timeout"}
