"""Rollups are written with the records, in the same transaction, at three resolutions."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from django.db import connection

from tests.usage.conftest import FlakyWrites
from tests.usage.monitoring import call, write_calls
from usage.calls import PERSISTED_FIELDS, call_prepare
from usage.models import CallRecord, DayRollup, HourRollup, MinuteRollup, Outcome, UsageSource
from usage.recorder import Recorder
from usage.spool import row_to_json

T = datetime(2025, 5, 6, 10, 15, 30, tzinfo=UTC)
pytestmark = pytest.mark.django_db


def test_one_batch_fills_minute_hour_and_day_rows() -> None:
    write_calls(
        [
            call(started_at=T, latency_ms=100, prompt_tokens=10, completion_tokens=5,
                 usage_source=UsageSource.REPORTED, cost_usd=Decimal("0.001")),
            call(started_at=T + timedelta(seconds=20), latency_ms=300, prompt_tokens=1,
                 usage_source=UsageSource.ESTIMATED, cost_usd=Decimal("0.0005")),
            call(started_at=T + timedelta(minutes=50), latency_ms=200),
        ]
    )  # fmt: skip
    minutes = list(MinuteRollup.objects.order_by("bucket_start"))
    assert [(m.bucket_start.minute, m.calls) for m in minutes] == [(15, 2), (5, 1)]
    first = minutes[0]
    assert first.prompt_tokens == 11
    assert first.total_tokens == 16
    assert (first.reported_tokens, first.estimated_tokens) == (15, 1)
    assert first.cost_e10 == 15_000_000
    assert (first.latency_min, first.latency_max, first.latency_sum) == (100, 300, 400)
    hours = list(HourRollup.objects.order_by("bucket_start"))
    assert [(h.bucket_start.hour, h.calls) for h in hours] == [(10, 2), (11, 1)]
    day = DayRollup.objects.get()
    assert day.bucket_start == datetime(2025, 5, 6, tzinfo=UTC)
    assert day.calls == 3
    assert (day.latency_min, day.latency_max) == (100, 300)


def test_extrapolated_usage_counts_as_estimated_tokens() -> None:
    write_calls(
        [
            call(started_at=T, prompt_tokens=7, usage_source=UsageSource.ESTIMATED),
            call(started_at=T, prompt_tokens=1000, usage_source=UsageSource.EXTRAPOLATED),
        ]
    )
    for model in (MinuteRollup, HourRollup, DayRollup):
        row = model.objects.get()
        assert (row.estimated_tokens, row.reported_tokens, row.total_tokens) == (1007, None, 1007)


def test_zero_counters_are_stored_as_null() -> None:
    write_calls([call(started_at=T)])
    row = MinuteRollup.objects.get()
    assert row.outcome_success == 1
    assert row.outcome_timeout is None
    assert row.ttft_count is None
    assert row.latency_h00 is None


def test_a_second_batch_adds_to_the_same_buckets_and_widens_min_and_max() -> None:
    write_calls([call(started_at=T, latency_ms=500, outcome=Outcome.TIMEOUT)])
    write_calls([call(started_at=T, latency_ms=50, outcome=Outcome.TIMEOUT)])
    write_calls([call(started_at=T, latency_ms=5000, outcome=Outcome.TIMEOUT)])
    row = MinuteRollup.objects.get()
    assert (row.calls, row.outcome_timeout, row.ok) == (3, 3, False)
    assert (row.latency_min, row.latency_max) == (50, 5000)
    assert HourRollup.objects.get().latency_count == 3


def test_every_dimension_splits_rows() -> None:
    write_calls(
        [
            call(started_at=T),
            call(started_at=T, provider="other"),
            call(started_at=T, requested_model="m2"),
            call(started_at=T, key_id="k2"),
            call(started_at=T, client="c2"),
            call(started_at=T, stream=True),
            call(started_at=T, outcome=Outcome.RATE_LIMITED),
        ]
    )
    assert MinuteRollup.objects.count() == 7
    assert DayRollup.objects.count() == 7


def test_buckets_are_utc_whatever_the_offset_of_the_timestamp() -> None:
    local = datetime(2025, 3, 30, 3, 30, tzinfo=UTC).astimezone(
        __import__("zoneinfo").ZoneInfo("Europe/Berlin")
    )
    write_calls([call(started_at=local)])
    assert MinuteRollup.objects.get().bucket_start == datetime(2025, 3, 30, 3, 30, tzinfo=UTC)
    assert DayRollup.objects.get().bucket_start == datetime(2025, 3, 30, tzinfo=UTC)


def test_a_failed_batch_leaves_neither_records_nor_rollups(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import usage.calls as calls_module

    def broken(*, records: list[CallRecord]) -> None:
        raise RuntimeError("rollup write failed")

    monkeypatch.setattr(calls_module, "rollups_upsert", broken)
    with pytest.raises(RuntimeError):
        write_calls([call(started_at=T)])
    assert not CallRecord.objects.exists()
    assert not MinuteRollup.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_spool_replay_writes_rollups_too(tmp_path: Path) -> None:
    rows = [call_prepare(call(started_at=T), log=False) for _ in range(3)]
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / "calls-20250101T000000000000Z-1-0000.jsonl").write_text(
        "".join(row_to_json(row) + "\n" for row in rows)
    )
    recorder = Recorder(spool_dir=spool, flush_seconds=3600)
    try:
        assert recorder.flush()
    finally:
        recorder.stop()
    assert CallRecord.objects.count() == 3
    assert DayRollup.objects.get().calls == 3


def test_flaky_writes_retry_the_whole_transaction() -> None:
    # The recorder's retry path calls calls_write again with the same records: the first
    # attempt must not have left rollups behind.
    flaky = FlakyWrites(failures=1)
    records = [CallRecord(**call_prepare(call(started_at=T), log=False))]
    with pytest.raises(Exception, match="refused"):
        flaky(records)
    flaky(records)
    assert MinuteRollup.objects.get().calls == 1


_WRITER = textwrap.dedent(
    """
    import os, sys, django
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llmrotate_site.settings")
    django.setup()
    from datetime import datetime
    from usage.models import CallRecord
    from usage.calls import calls_write
    from usage.spool import row_from_json
    fields = sys.argv[2].split(",")
    rows = [row_from_json(line, field_names=fields) for line in open(sys.argv[1])]
    for start in range(0, len(rows), 25):
        calls_write([CallRecord(**row) for row in rows[start:start + 25]])
    """
)


@pytest.mark.scaled
@pytest.mark.django_db(transaction=True)
def test_two_processes_writing_the_same_buckets_lose_no_increment(tmp_path: Path) -> None:
    """Both writers add to the same minute, hour and day rows at once; the totals must be the
    sum of both, whatever the interleaving (INSERT … ON CONFLICT DO UPDATE is atomic)."""
    per_process = 400
    files = []
    for n in range(2):
        rows = [
            call_prepare(
                call(started_at=T + timedelta(seconds=i % 60), latency_ms=10.0 + i + n,
                     client=f"c{i % 3}"),
                log=False,
            )
            for i in range(per_process)
        ]  # fmt: skip
        path = tmp_path / f"rows{n}.jsonl"
        path.write_text("".join(row_to_json(row) + "\n" for row in rows))
        files.append(path)
    db = connection.settings_dict
    user = db["USER"] + (f":{db['PASSWORD']}" if db.get("PASSWORD") else "")
    env = {
        **os.environ,
        "DATABASE_URL": f"postgres://{user}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(path), ",".join(PERSISTED_FIELDS)], env=env
        )
        for path in files
    ]
    assert [p.wait(timeout=90) for p in procs] == [0, 0]
    assert CallRecord.objects.count() == 2 * per_process
    for model in (MinuteRollup, HourRollup, DayRollup):
        assert sum(model.objects.values_list("calls", flat=True)) == 2 * per_process
        assert sum(model.objects.values_list("latency_count", flat=True)) == 2 * per_process
    by_client = dict(DayRollup.objects.values_list("client", "calls"))
    assert by_client == {"c0": 268, "c1": 266, "c2": 266}
    assert DayRollup.objects.get(client="c0").latency_min == 10.0
