"""The capture writer: masking before anything is written, files per hour and size, 0600,
retention and the size cap, and a disk that fails (capture pauses, nothing raises)."""

from __future__ import annotations

import errno
import os
import stat
import time
from pathlib import Path
from typing import Any

import cbor2
import pytest

from common.redaction import header_masked, scrub_secrets
from usage.capture.format import (
    NotACapture,
    capture_files,
    file_hour,
    find_request,
    read_file,
)
from usage.capture.writer import CaptureWriter, prepared

SECRET = "sk-test-writer-9Zq4Lm2Xv8Rt6Yp1"
TOKEN = "llmr_abcd1234_Zq4Lm2Xv8Rt6Yp1Wn3Hk5"


def writer(folder: Path, **options: Any) -> CaptureWriter:
    settings = {
        "file_max_bytes": 1024 * 1024,
        "total_max_bytes": 10 * 1024 * 1024,
        "retention_seconds": 3600.0,
        "queue_max": 100,
        "retry_seconds": 60.0,
        **options,
    }
    return CaptureWriter(folder, **settings)


def exchange(request_id: str = "r1", *, body: bytes = b"{}", **extra: Any) -> dict[str, Any]:
    """An upstream leg (`leg=`, `attempt=` change that), carrying a key and a token in its
    headers, URL and body."""
    return {
        "type": "exchange",
        "request_id": request_id,
        "leg": "upstream",
        "attempt": 1,
        "time": time.time(),
        "secrets": (SECRET, TOKEN),
        "request": {
            "method": "POST",
            "url": "https://api.example.com/v1/chat/completions?api-version=1&key=" + SECRET,
            "headers": [
                ["authorization", f"Bearer {SECRET}"],
                ["x-api-key", SECRET],
                ["x-goog-api-key", SECRET],
                ["cookie", "session=abcdef123456"],
                ["content-type", "application/json"],
                ["x-ratelimit-remaining-tokens", "999"],
            ],
            "body": body,
            "t": 0.5,
        },
        "response": {
            "status": 200,
            "headers": [["set-cookie", "sid=zzzzzzzzzzzz"]],
            "chunks": [
                [10.0, b'data: {"a": "' + SECRET[:10].encode()],
                [11.0, SECRET[10:].encode() + b'"}\n\n'],
            ],
            "end": "complete",
            "t_end": 12.0,
        },
        **extra,
    }


def test_credentials_are_masked_in_headers_urls_and_bodies_even_across_chunks(tmp_path: Path):
    w = writer(tmp_path)
    w.submit(
        exchange(body=b'{"note": "key ' + SECRET.encode() + b" token " + TOKEN.encode() + b'"}')
    )
    w.stop()
    data = b"".join(p.read_bytes() for p in capture_files(tmp_path))
    for secret in (SECRET, TOKEN, "abcdef123456", "zzzzzzzzzzzz"):
        runs = {secret[i : i + 8].encode() for i in range(len(secret) - 7)}
        assert not any(run in data for run in runs), secret
    [item] = read_file(capture_files(tmp_path)[0]).exchanges
    headers = dict(item.request.headers)
    assert headers["authorization"].startswith("Bearer sk-")
    assert headers["content-type"] == "application/json"
    assert headers["x-ratelimit-remaining-tokens"] == "999"  # a counter, not a credential
    assert "api-version=1" in item.request.raw["url"] and "key=" in item.request.raw["url"]
    # Scrubbing keeps lengths, so the stream's chunks still cut where they were received.
    assert [len(c) for _, c in item.response.chunks] == [23, len(SECRET) - 10 + 4]


def eight_character_runs(secret: str) -> set[str]:
    return {secret[i : i + 8] for i in range(len(secret) - 7)}


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("Authorization", "Bearer " + SECRET),
        ("x-api-key", SECRET),
        ("X-Custom-Token", SECRET),
        ("x-forwarded-note", f"see {SECRET}"),  # not named a credential: masked by its shape
        ("x-forwarded-note", f"token={TOKEN}&x=1"),
    ],
)
def test_no_eight_characters_of_a_secret_survive_header_masking(name: str, value: str):
    masked = header_masked(name, value)
    assert not any(
        run in masked for run in eight_character_runs(SECRET) | eight_character_runs(TOKEN)
    )


def test_harmless_headers_are_kept_as_they_are():
    assert header_masked("x-request-id", "abc") == "abc"
    assert header_masked("x-ratelimit-remaining-tokens", "999") == "999"
    assert SECRET not in header_masked("X-Custom-Token", SECRET)
    assert header_masked("x-request-id", "abc") == "abc"
    assert SECRET not in header_masked("x-forwarded-note", f"see {SECRET}")
    assert scrub_secrets(b"no secrets here", {SECRET}) == b"no secrets here"


def test_files_are_private_self_describing_and_named_by_hour(tmp_path: Path):
    w = writer(tmp_path / "captures")
    w.submit(exchange())
    w.stop()
    [path] = capture_files(tmp_path / "captures")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "captures").stat().st_mode) == 0o700
    assert path.read_bytes()[:3] == b"\xd9\xd9\xf7"  # the self-describe tag
    assert file_hour(path) is not None
    capture = read_file(path)
    assert capture.header["format"] == "llmrotate-capture" and capture.header["fields"]
    assert [e.request_id for e in capture.exchanges] == ["r1"]


def test_a_new_file_starts_when_one_reaches_its_size_limit(tmp_path: Path):
    w = writer(tmp_path, file_max_bytes=4096)
    for i in range(10):
        w.submit(exchange(f"r{i}", body=b"x" * 1500))
        w.drain()
    w.stop()
    files = capture_files(tmp_path)
    assert len(files) >= 4
    assert all(p.stat().st_size <= 4096 for p in files)
    assert sorted(e.request_id for p in files for e in read_file(p).exchanges) == sorted(
        f"r{i}" for i in range(10)
    )


def test_old_files_and_files_over_the_cap_are_pruned(tmp_path: Path):
    old = tmp_path / "capture-20200101T00-host-1-0.cbor"
    old.write_bytes(b"\xd9\xd9\xf7")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    w = writer(tmp_path, file_max_bytes=3000, total_max_bytes=8000, retention_seconds=3600)
    for i in range(12):
        w.submit(exchange(f"r{i}", body=b"y" * 1500))
        w.drain()
    w.prune()
    w.stop()
    assert not old.exists()
    files = capture_files(tmp_path)
    assert sum(p.stat().st_size for p in files) <= 8000
    # The newest survive: the last request is still there.
    assert find_request("r11", directory=tmp_path, when=None)
    assert not find_request("r0", directory=tmp_path, when=None)


def test_a_full_disk_pauses_capture_and_nothing_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    w = writer(tmp_path, retry_seconds=0.2)
    real_write = os.write

    def full(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    w.submit(exchange("lost"))
    w.drain()
    assert "wire capture paused" in caplog.text and "No space left" in caplog.text
    w.submit(exchange("also-lost"))  # dropped at once while paused: never queued
    assert w.dropped == 2
    monkeypatch.setattr(os, "write", real_write)
    deadline = time.monotonic() + 5
    while time.monotonic() < w.paused_until and time.monotonic() < deadline:
        time.sleep(0.01)
    w.submit(exchange("kept"))
    w.stop()
    ids = [e.request_id for p in capture_files(tmp_path) for e in read_file(p).exchanges]
    assert ids == ["kept"]


def test_a_full_queue_drops_instead_of_growing(tmp_path: Path):
    w = writer(tmp_path, queue_max=3)
    w._thread = object()  # type: ignore[assignment]  # no thread drains it meanwhile
    for i in range(5):
        w.submit(exchange(f"r{i}"))
    assert (len(w._queue), w.dropped) == (3, 2)


def test_a_torn_last_item_is_reported_and_the_rest_read(tmp_path: Path):
    w = writer(tmp_path)
    w.submit(exchange("whole"))
    w.stop()
    [path] = capture_files(tmp_path)
    with path.open("ab") as fp:
        fp.write(cbor2.dumps(prepared(exchange("torn")))[:-5])
    capture = read_file(path)
    assert [e.request_id for e in capture.exchanges] == ["whole"]
    assert capture.problem and "torn" in capture.problem


def test_another_file_is_not_taken_for_a_capture(tmp_path: Path):
    path = tmp_path / "capture-20261207T11-h-1-0.cbor"
    path.write_bytes(cbor2.dumps({"hello": "world"}))
    with pytest.raises(NotACapture, match="not a capture file"):
        read_file(path)


@pytest.mark.django_db
def test_the_hourly_prune_task_deletes_old_capture_files_when_nothing_is_captured(
    tmp_path: Path, settings: Any
):
    from usage.capture.writer import capture_writer_reset
    from usage.tasks import usage_prune

    settings.LLMROTATE_CAPTURE_DIR = tmp_path
    settings.LLMROTATE_CAPTURE_RETENTION_HOURS = 1
    capture_writer_reset()
    old = tmp_path / "capture-20200101T00-host-1-0.cbor"
    recent = tmp_path / "capture-20200101T01-host-1-0.cbor"
    for path in (old, recent):
        path.write_bytes(b"\xd9\xd9\xf7")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    usage_prune()
    assert capture_files(tmp_path) == [recent]


def test_written_and_dropped_exchanges_are_counted_for_prometheus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from common import metrics

    def value(instrument: Any, **labels: str) -> float:
        return (
            instrument.prom.labels(**labels)._value.get()
            if labels
            else instrument.prom._value.get()
        )

    written0 = value(metrics.CAPTURE_WRITTEN)
    failed0 = value(metrics.CAPTURE_DROPPED, reason="write_failed")
    paused0 = value(metrics.CAPTURE_DROPPED, reason="paused")
    w = writer(tmp_path)
    w.submit(exchange("a"))
    w.submit(exchange("b"))
    w.drain()
    assert value(metrics.CAPTURE_WRITTEN) - written0 == 2

    def full(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    w._thread = object()  # type: ignore[assignment]  # no thread: this test drains
    w._close_file()  # the next write opens a new file, whose header fails
    w.submit(exchange("c"))
    w.drain()
    w.submit(exchange("d"))
    assert value(metrics.CAPTURE_DROPPED, reason="write_failed") - failed0 == 1
    assert value(metrics.CAPTURE_DROPPED, reason="paused") - paused0 == 1


def test_a_prune_never_deletes_a_file_a_live_process_is_writing(tmp_path: Path):
    # Another live process of this host (ours, by pid) has an old, big file open: over the
    # cap and past the retention age, it still stays; its older file goes.
    import socket

    host = socket.gethostname().split(".")[0][:32] or "host"
    older = tmp_path / f"capture-20200101T00-{host}-{os.getpid()}-0.cbor"
    open_now = tmp_path / f"capture-20200101T00-{host}-{os.getpid()}-1.cbor"
    dead = tmp_path / f"capture-20200101T00-{host}-999999999-0.cbor"
    for path in (older, open_now, dead):
        path.write_bytes(b"x" * 5000)
        os.utime(path, (time.time() - 7200, time.time() - 7200))
    writer(tmp_path, total_max_bytes=1000, retention_seconds=3600).prune()
    assert capture_files(tmp_path) == [open_now]


def test_a_file_deleted_under_the_writer_is_replaced_by_a_new_one(tmp_path: Path):
    w = writer(tmp_path)
    w._thread = object()  # type: ignore[assignment]  # no thread: this test drains
    w.submit(exchange("first"))
    w.drain()
    [path] = capture_files(tmp_path)
    path.unlink()
    w.submit(exchange("second"))
    w.drain()
    w._thread = None
    w.stop()
    assert [e.request_id for p in capture_files(tmp_path) for e in read_file(p).exchanges] == [
        "second"
    ]


def test_one_request_is_found_through_the_index_without_reading_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from usage.capture import format as capture_format

    w = writer(tmp_path)
    for i in range(50):
        w.submit(exchange(f"r{i}"))
    w.submit(exchange("r7", leg="client", attempt=0))
    w.stop()
    [path] = capture_files(tmp_path)
    assert capture_format.index_path(path).exists()

    def no_scan(capture: Any) -> Any:
        raise AssertionError("the whole file was read")

    monkeypatch.setattr(capture_format, "iter_file", no_scan)
    found = find_request("r7", directory=tmp_path, when=None)
    assert [(e.leg, e.attempt) for e in found] == [("client", 0), ("upstream", 1)]


def test_a_reader_skips_items_not_shaped_as_exchanges(tmp_path: Path):
    w = writer(tmp_path)
    w.submit(exchange("good"))
    w.stop()
    [path] = capture_files(tmp_path)
    hostile = [
        {"type": "exchange", "request_id": "huge", "request": {"body": 10**12}},
        {"type": "exchange", "request_id": "chunks", "response": {"chunks": [[0, 5]]}},
        {"type": "exchange", "request_id": "headers", "request": {"headers": [[1, 2, 3]]}},
        {"type": "exchange", "request_id": "message", "response": "nope"},
    ]
    with path.open("ab") as fp:
        for item in hostile:
            fp.write(cbor2.dumps(item))
    capture = read_file(path)
    assert [e.request_id for e in capture.exchanges] == ["good"]
    assert capture.problem and "4 item(s)" in capture.problem
    assert find_request("huge", directory=tmp_path, when=None) == []


def test_the_queue_is_bounded_in_bytes_too(tmp_path: Path):
    w = writer(tmp_path, queue_max_bytes=10_000)
    w._thread = object()  # type: ignore[assignment]
    w.submit(exchange("a"), 6_000)
    w.submit(exchange("b"), 6_000)
    assert (len(w._queue), w.dropped) == (1, 1)
