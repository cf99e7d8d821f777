"""Starting, stopping and exiting: a graceful stop loses nothing, even with the database down."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from django.conf import settings

import usage.recorder as recorder_module
from tests.usage.conftest import FlakyWrites, make_call
from usage.models import CallRecord
from usage.recorder import Recorder, get_recorder, record_call

pytestmark = pytest.mark.django_db(transaction=True)


def test_the_thread_starts_on_the_first_record(make_recorder: Callable[..., Recorder]) -> None:
    recorder = make_recorder()
    assert recorder._thread is None
    recorder.record(make_call())
    assert recorder._thread is not None and recorder._thread.daemon


def test_a_graceful_stop_writes_what_is_buffered_and_ends_the_thread(
    make_recorder: Callable[..., Recorder],
) -> None:
    recorder = make_recorder()  # flushes hourly: only stop() can have written these
    for i in range(5):
        recorder.record(make_call(request_id=f"req-{i}"))
    thread = recorder._thread
    assert recorder.stop()
    assert CallRecord.objects.count() == 5
    assert thread is not None and not thread.is_alive()


def test_stop_is_idempotent(make_recorder: Callable[..., Recorder]) -> None:
    recorder = make_recorder()
    recorder.record(make_call())
    assert recorder.stop()
    assert recorder.stop()
    assert make_recorder().stop()  # never started
    assert CallRecord.objects.count() == 1


def test_recording_after_a_stop_starts_a_new_flusher(
    make_recorder: Callable[..., Recorder],
) -> None:
    recorder = make_recorder()
    recorder.record(make_call(request_id="before"))
    assert recorder.stop()
    recorder.record(make_call(request_id="after"))
    assert recorder._thread is not None and recorder._thread.is_alive()
    assert recorder.flush()
    assert CallRecord.objects.count() == 2


def test_a_stop_with_the_database_down_spools_everything_for_the_next_process(
    make_recorder: Callable[..., Recorder],
    flaky_writes: Callable[..., FlakyWrites],
    spool_dir: Path,
) -> None:
    flaky = flaky_writes(down=True)
    recorder = make_recorder()
    for i in range(5):
        recorder.record(make_call(request_id=f"req-{i}"))
    assert not recorder.stop(timeout=0.5)
    assert recorder.backlog == 0
    assert len(list(spool_dir.glob("calls-*.jsonl"))) == 1

    flaky.down = False
    assert make_recorder().flush()  # the next process
    assert CallRecord.objects.count() == 5
    assert not list(spool_dir.iterdir())


def test_get_recorder_returns_one_recorder_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recorder_module, "_recorder", None)
    first = get_recorder()
    try:
        assert get_recorder() is first
    finally:
        first.stop()


def test_record_call_goes_to_the_process_recorder(recorder: Recorder) -> None:
    record_call(make_call())
    assert recorder.flush()
    assert CallRecord.objects.count() == 1


def test_the_exit_hook_flushes_the_process_recorder(recorder: Recorder) -> None:
    record_call(make_call())
    recorder_module._stop_at_exit()
    assert CallRecord.objects.count() == 1


def test_a_forked_child_does_not_write_its_parents_buffer(
    monkeypatch: pytest.MonkeyPatch, recorder: Recorder
) -> None:
    recorder_module._forget_after_fork()
    fresh = get_recorder()
    monkeypatch.setattr(recorder_module, "_recorder", recorder)  # restore for teardown
    assert fresh is not recorder
    assert fresh.backlog == 0


def test_an_interpreter_exit_flushes_what_is_buffered_and_estimating(tmp_path: Path) -> None:
    """A real process that records two calls (one to estimate) and exits without stopping
    anything."""
    env = {
        **os.environ,
        "LLMROTATE_DATA_DIR": str(tmp_path),
        "DATABASE_URL": f"sqlite:///{tmp_path / 'exit.sqlite3'}",
        "DJANGO_SETTINGS_MODULE": "llmrotate_site.settings",
        "LLMROTATE_RECORD_FLUSH_SECONDS": "3600",
    }
    python, cwd = sys.executable, str(settings.BASE_DIR)
    migrate = [python, "manage.py", "migrate", "usage", "--skip-checks", "-v0"]
    subprocess.run(migrate, cwd=cwd, env=env, check=True, timeout=60)
    script = textwrap.dedent(
        """
        import django
        django.setup()
        from datetime import UTC, datetime
        from usage.calls import CallData
        from usage.recorder import record_call
        now = datetime.now(UTC)
        record_call(CallData(request_id="at-exit", started_at=now, finished_at=now,
                             requested_model="m", outcome="success"))
        record_call(CallData(request_id="estimated", started_at=now, finished_at=now,
                             requested_model="m", outcome="success",
                             estimate=("hello", "world " * 10_000)))
        """
    )
    subprocess.run([python, "-c", script], cwd=cwd, env=env, check=True, timeout=60)
    with sqlite3.connect(tmp_path / "exit.sqlite3") as db:
        rows = db.execute(
            "select request_id, completion_tokens > 0 from usage_callrecord order by request_id"
        ).fetchall()
    assert rows == [("at-exit", 0), ("estimated", 1)]
