"""The recorder when the database is not there: retried, spooled, replayed, never dropped."""

from __future__ import annotations

import fcntl
import json
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
from django.db import OperationalError, connection

import usage.recorder as recorder_module
from tests.usage.conftest import FlakyWrites, make_call, wait_until
from usage.calls import PERSISTED_FIELDS
from usage.models import CallRecord
from usage.recorder import Recorder
from usage.spool import row_fit_to_columns, spool_write

pytestmark = pytest.mark.django_db(transaction=True)

PROMPT = "user: a secret plan"


def spooled_rows(spool_dir: Path) -> list[dict[str, object]]:
    return [
        json.loads(line)
        for path in sorted(spool_dir.glob("calls-*.jsonl"))
        for line in path.read_text().splitlines()
    ]


def rows_for(request_ids: list[str]) -> list[dict[str, object]]:
    return [
        row_fit_to_columns(
            {name: getattr(make_call(request_id=r), name) for name in PERSISTED_FIELDS}
        )
        for r in request_ids
    ]


def test_a_failed_write_is_retried_with_backoff_until_it_succeeds(
    make_recorder: Callable[..., Recorder],
    flaky_writes: Callable[..., FlakyWrites],
    caplog: pytest.LogCaptureFixture,
    usage_log: list[str],
) -> None:
    flaky = flaky_writes(failures=3)
    recorder = make_recorder(flush_seconds=0.05)
    for i in range(20):
        recorder.record(make_call(request_id=f"req-{i}"))

    # No flush(): the flusher retries on its own (backoff 0.5 s, 1 s, 2 s).
    wait_until(lambda: CallRecord.objects.count() == 20)
    assert flaky.calls == 4
    warnings = [r.getMessage() for r in caplog.records if r.name == "usage.recorder"]
    assert len(warnings) == 3
    assert all("OperationalError" in w and "retrying" in w for w in warnings)
    assert len(usage_log) == 20  # logged once, before the first attempt; not on each retry


def test_flush_keeps_retrying_within_its_timeout(
    make_recorder: Callable[..., Recorder], flaky_writes: Callable[..., FlakyWrites]
) -> None:
    flaky_writes(failures=2)
    recorder = make_recorder()
    recorder.record(make_call())
    assert recorder.flush(timeout=10)
    assert CallRecord.objects.count() == 1


def test_flush_reports_failure_and_keeps_the_records_while_the_database_is_down(
    make_recorder: Callable[..., Recorder], flaky_writes: Callable[..., FlakyWrites]
) -> None:
    flaky = flaky_writes(down=True)
    recorder = make_recorder()
    for i in range(3):
        recorder.record(make_call(request_id=f"req-{i}"))
    assert not recorder.flush(timeout=0.5)
    assert recorder.backlog == 3

    flaky.down = False
    assert recorder.flush()
    assert CallRecord.objects.count() == 3
    assert recorder.backlog == 0


def test_overflow_is_spooled_to_disk_and_replayed_exactly_once_when_the_database_is_back(
    make_recorder: Callable[..., Recorder],
    flaky_writes: Callable[..., FlakyWrites],
    spool_dir: Path,
) -> None:
    flaky = flaky_writes(down=True)
    recorder = make_recorder(buffer_max=10)
    for i in range(25):
        recorder.record(make_call(request_id=f"req-{i:02d}", estimate=(PROMPT, "ok")))
    # A flush that gives up after 0.5 s may not have reached the flusher yet (the estimates
    # were still under way): flushes until one has, each failing, the database being down.
    wait_until(lambda: not recorder.flush(timeout=0.5) and spooled_rows(spool_dir))

    on_disk = spooled_rows(spool_dir)
    assert on_disk, "nothing was spooled"
    assert len(on_disk) + recorder.backlog == 25
    assert recorder.backlog <= 10
    assert all(set(row) == set(PERSISTED_FIELDS) for row in on_disk)
    assert not any(PROMPT in p.read_text() for p in spool_dir.iterdir())
    assert not list(spool_dir.glob("*.tmp"))

    flaky.down = False
    assert recorder.flush()
    ids = sorted(CallRecord.objects.values_list("request_id", flat=True))
    assert ids == [f"req-{i:02d}" for i in range(25)]
    assert not list(spool_dir.iterdir())

    assert recorder.flush()
    assert CallRecord.objects.count() == 25


def test_a_spool_file_commits_all_or_nothing_when_the_replay_fails_midway(
    make_recorder: Callable[..., Recorder],
    monkeypatch: pytest.MonkeyPatch,
    spool_dir: Path,
) -> None:
    spool_write(spool_dir=spool_dir, rows=rows_for(["a", "b", "c", "d"]))
    real = recorder_module.calls_write
    batches: list[int] = []
    broken = True

    def fail_every_second_batch(records: list[CallRecord]) -> None:
        batches.append(len(records))
        if broken and len(batches) % 2 == 0:
            raise OperationalError("server closed the connection unexpectedly")
        real(records)

    monkeypatch.setattr(recorder_module, "calls_write", fail_every_second_batch)
    recorder = make_recorder(batch_size=2)  # the file goes in as two batches
    assert not recorder.flush(timeout=0.5)
    # Each first half was rolled back with its file. The writer may still be inside its next
    # try, so a read can meet its lock on SQLite: wait_until polls through that.
    wait_until(lambda: len(batches) >= 2 and CallRecord.objects.count() == 0)
    assert len(list(spool_dir.glob("calls-*.jsonl"))) == 1

    broken = False
    assert recorder.flush()
    assert sorted(CallRecord.objects.values_list("request_id", flat=True)) == list("abcd")
    assert not list(spool_dir.iterdir())


def test_a_spool_file_already_committed_by_a_crashed_replayer_is_not_inserted_twice(
    make_recorder: Callable[..., Recorder], spool_dir: Path
) -> None:
    rows = rows_for(["a", "b"])
    path = spool_write(spool_dir=spool_dir, rows=rows)
    CallRecord.objects.bulk_create([CallRecord(**row) for row in rows])  # committed, not unlinked

    assert make_recorder().flush()
    assert CallRecord.objects.count() == 2
    assert not path.exists()


def test_a_spool_file_locked_by_another_replayer_is_left_alone(
    make_recorder: Callable[..., Recorder], spool_dir: Path
) -> None:
    path = spool_write(spool_dir=spool_dir, rows=rows_for(["a"]))
    recorder = make_recorder()
    with open(path) as other_process:
        fcntl.flock(other_process.fileno(), fcntl.LOCK_EX)
        assert recorder.flush()
        assert CallRecord.objects.count() == 0
        assert path.exists()
    assert recorder.flush()
    assert CallRecord.objects.count() == 1


def test_an_unreadable_spool_file_is_set_aside_not_deleted(
    make_recorder: Callable[..., Recorder], spool_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool_dir.mkdir()
    (spool_dir / "calls-20250101T000000000000Z-1-0000.jsonl").write_text("{not json\n")
    spool_write(spool_dir=spool_dir, rows=rows_for(["good"]))
    with caplog.at_level(logging.ERROR, logger="usage.spool"):
        assert make_recorder().flush()
    assert CallRecord.objects.filter(request_id="good").count() == 1
    assert [p.name for p in spool_dir.iterdir()] == ["calls-20250101T000000000000Z-1-0000.corrupt"]


def test_a_new_recorder_replays_what_a_previous_process_spooled(
    make_recorder: Callable[..., Recorder], spool_dir: Path
) -> None:
    spool_write(spool_dir=spool_dir, rows=rows_for(["left-by-a-crash"]))
    recorder = make_recorder()
    recorder.record(make_call(request_id="new"))  # starting the thread replays the spool
    recorder._wake.set()
    # The file goes once its rows have committed: wait for both.
    wait_until(lambda: CallRecord.objects.count() == 2 and not list(spool_dir.iterdir()))


def test_spool_files_replay_oldest_first(
    make_recorder: Callable[..., Recorder], spool_dir: Path
) -> None:
    for name in ("first", "second", "third"):
        spool_write(spool_dir=spool_dir, rows=rows_for([name]))
    assert make_recorder().flush()
    in_insert_order = CallRecord.objects.order_by("id").values_list("request_id", flat=True)
    assert list(in_insert_order) == ["first", "second", "third"]


@pytest.mark.skipif(connection.vendor != "postgresql", reason="needs a server to cut connections")
def test_a_connection_cut_by_a_database_restart_is_replaced(
    make_recorder: Callable[..., Recorder],
) -> None:
    recorder = make_recorder()
    recorder.record(make_call(request_id="before"))
    assert recorder.flush()
    with connection.cursor() as cursor:  # what a restart does to the flusher's connection
        cursor.execute(
            "select pg_terminate_backend(pid) from pg_stat_activity"
            " where datname = current_database() and pid <> pg_backend_pid()"
        )
    recorder.record(make_call(request_id="after"))
    assert recorder.flush()
    assert CallRecord.objects.count() == 2


def test_an_outage_that_lasts_sends_what_is_held_to_disk_at_once(
    make_recorder: Callable[..., Recorder],
    flaky_writes: Callable[..., FlakyWrites],
    spool_dir: Path,
) -> None:
    """Far below LLMROTATE_RECORD_BUFFER_MAX, records are still spooled once the database has
    been failing for LLMROTATE_RECORD_SPOOL_AFTER_SECONDS: a process killed then loses only
    what came after the last pass, not the whole outage."""
    flaky = flaky_writes(down=True)
    recorder = make_recorder(flush_seconds=0.05, spool_after=0.3, batch_size=4)
    for i in range(10):
        recorder.record(make_call(request_id=f"early-{i}"))
    wait_until(lambda: len(spooled_rows(spool_dir)) == 10 and recorder.backlog == 0)
    # A file per batch, so that each commits all-or-nothing on replay.
    assert sorted(len(p.read_text().splitlines()) for p in spool_dir.glob("*.jsonl")) == [2, 4, 4]
    recorder.record(make_call(request_id="later"))  # still down: on disk by the next pass
    wait_until(lambda: len(spooled_rows(spool_dir)) == 11 and recorder.backlog == 0)

    flaky.down = False
    assert recorder.flush()
    assert CallRecord.objects.count() == 11
    assert not spooled_rows(spool_dir)


def test_a_passing_failure_is_retried_in_memory_not_spooled(
    make_recorder: Callable[..., Recorder],
    flaky_writes: Callable[..., FlakyWrites],
    spool_dir: Path,
) -> None:
    flaky_writes(failures=1)
    recorder = make_recorder(flush_seconds=0.05, spool_after=30)
    recorder.record(make_call())
    wait_until(lambda: CallRecord.objects.count() == 1)
    assert not list(spool_dir.glob("*.jsonl"))


def test_a_spool_file_that_fails_to_replay_does_not_send_new_records_to_the_spool(
    make_recorder: Callable[..., Recorder],
    spool_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The database takes writes; only the replay fails (a file it cannot remove, a row it
    refuses). New records still go straight to the table, not after the broken file."""

    def broken(**_: object) -> int:
        raise PermissionError("the spool file cannot be removed")

    monkeypatch.setattr(recorder_module, "spool_replay_file", broken)
    spool_write(spool_dir=spool_dir, rows=rows_for(["old"]))
    recorder = make_recorder(flush_seconds=0.05, spool_after=0.1)
    for i in range(3):
        recorder.record(make_call(request_id=f"new-{i}"))
        wait_until(lambda n=i: CallRecord.objects.count() == n + 1)
    assert len(spooled_rows(spool_dir)) == 1  # only the file that was there
