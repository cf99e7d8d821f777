"""The recorder on a healthy database: off the hot path, batched, logged, estimated, priced."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import fields
from datetime import datetime
from decimal import Decimal

import pytest
from asgiref.sync import sync_to_async
from django.db import connection, connections
from django.test.utils import CaptureQueriesContext

import usage.calls as calls_module
import usage.recorder as recorder_module
from tests.usage.conftest import make_call, wait_until
from usage.calls import PERSISTED_FIELDS, CallData
from usage.models import CallRecord, UsageSource
from usage.recorder import Recorder, record_call
from usage.tokens import estimate_tokens

PROMPT = "user: What is the capital of France? Answer in one sentence."
COMPLETION = "Paris is the capital of France."

pytestmark = pytest.mark.django_db(transaction=True)


def test_call_data_carries_exactly_the_call_record_columns_plus_its_private_fields() -> None:
    columns = {f.name for f in CallRecord._meta.concrete_fields} - {"id"}
    assert set(PERSISTED_FIELDS) == columns
    assert {f.name for f in fields(CallData)} - columns == {
        "provider_kind",
        "cache_write_tokens",
        "estimate",
        "estimate_chars",
        "max_output_tokens",
        "prompt_body",
        "forwarded_body",
        "trace_id",
        "span_id",
        "limits",
        "key_limits",
        "metric_route",
        "metric_model",
    }


def test_record_call_does_no_database_work_on_the_calling_thread(recorder: Recorder) -> None:
    with CaptureQueriesContext(connection) as queries:
        for i in range(50):
            record_call(make_call(request_id=f"req-{i}", prompt_tokens=10, completion_tokens=5))
    assert len(queries) == 0
    assert recorder.flush()
    assert CallRecord.objects.count() == 50


def test_pricing_runs_on_the_flusher_thread_and_token_estimates_on_the_estimator(
    recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[str, str]] = []

    def spy(name: str, real: Callable[..., object]) -> Callable[..., object]:
        def wrapper(*args: object, **kwargs: object) -> object:
            seen.append((name, threading.current_thread().name))
            return real(*args, **kwargs)

        return wrapper

    for name in ("call_cost", "estimate_prompt_tokens", "estimate_text_tokens"):
        monkeypatch.setattr(calls_module, name, spy(name, getattr(calls_module, name)))
    record_call(make_call(estimate=(PROMPT, COMPLETION)))
    assert recorder.flush()
    assert sorted(seen) == [
        ("call_cost", "llmrotate-recorder"),
        ("estimate_prompt_tokens", "llmrotate-estimator"),
        ("estimate_text_tokens", "llmrotate-estimator"),
    ]


def test_record_call_returns_at_once_while_a_database_write_hangs(
    recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    real = recorder_module.calls_write

    def hanging(records: list[CallRecord]) -> None:
        release.wait(10)
        real(records)

    monkeypatch.setattr(recorder_module, "calls_write", hanging)
    record_call(make_call(request_id="first"))
    recorder._wake.set()  # the flusher picks up "first" and blocks in the write
    wait_until(lambda: recorder.backlog == 1 and not recorder._buffer)

    started = time.perf_counter()
    for i in range(200):
        record_call(make_call(request_id=f"req-{i}"))
    elapsed = time.perf_counter() - started

    release.set()
    assert elapsed < 0.5
    assert recorder.flush()
    assert CallRecord.objects.count() == 201


async def test_record_call_and_flush_work_from_inside_an_event_loop(recorder: Recorder) -> None:
    record_call(make_call(request_id="from-the-loop"))
    # flush() hands the work to the flusher thread, so the ORM's async guard is never hit.
    assert recorder.flush()

    def count() -> int:
        try:
            return CallRecord.objects.filter(request_id="from-the-loop").count()
        finally:
            connections.close_all()  # asgiref's worker thread would keep it open otherwise

    assert await sync_to_async(count)() == 1


def test_flush_writes_every_recorded_call_with_its_fields(recorder: Recorder) -> None:
    record_call(
        make_call(
            request_id="req-42",
            attempt=2,
            stream=True,
            prompt_tokens=1000,
            completion_tokens=500,
            total_tokens=1500,
            cached_tokens=400,
            usage_source=UsageSource.REPORTED,
            ttft_ms=120.5,
        )
    )
    assert recorder.flush()
    row = CallRecord.objects.get()
    assert (row.request_id, row.attempt, row.stream) == ("req-42", 2, True)
    assert (row.prompt_tokens, row.completion_tokens, row.total_tokens) == (1000, 500, 1500)
    assert row.ttft_ms == 120.5
    assert row.usage_source == UsageSource.REPORTED
    # gpt-4o-mini, $ per 1M tokens: 600 input at 0.15 + 400 cached at 0.075 + 500 output at 0.60
    assert row.cost_usd == Decimal("0.00042")


def test_a_cost_given_by_the_proxy_is_kept(recorder: Recorder) -> None:
    record_call(make_call(prompt_tokens=10, completion_tokens=10, cost_usd=Decimal("1.5")))
    assert recorder.flush()
    assert CallRecord.objects.get().cost_usd == Decimal("1.5")


def test_a_call_without_tokens_has_no_cost(recorder: Recorder) -> None:
    record_call(make_call(outcome="rate_limited", status_code=429))
    assert recorder.flush()
    assert CallRecord.objects.get().cost_usd is None


def test_a_full_batch_is_written_without_waiting_for_the_flush_interval(
    make_recorder: Callable[..., Recorder],
) -> None:
    recorder = make_recorder(batch_size=10)  # and a flush interval of an hour
    assert recorder.flush()  # the flusher is up and idle
    for i in range(10):
        recorder.record(make_call(request_id=f"req-{i}"))
    wait_until(lambda: CallRecord.objects.count() == 10)


def test_the_flush_interval_writes_a_partial_batch(make_recorder: Callable[..., Recorder]) -> None:
    recorder = make_recorder(flush_seconds=0.1)
    recorder.record(make_call())
    wait_until(lambda: CallRecord.objects.count() == 1)


def test_each_record_is_logged_once_as_json_without_any_text(
    recorder: Recorder, usage_log: list[str]
) -> None:
    record_call(make_call(request_id="a", prompt_tokens=1000, completion_tokens=500))
    record_call(make_call(request_id="b", estimate=(PROMPT, COMPLETION)))
    assert recorder.flush()

    assert len(usage_log) == 2
    entries = [json.loads(line) for line in usage_log]
    for entry in entries:
        assert set(entry) == set(PERSISTED_FIELDS)
        assert datetime.fromisoformat(entry["started_at"]).utcoffset() is not None
    assert entries[0]["cost_usd"] == "0.0004500000"
    assert "France" not in "".join(usage_log)


def test_a_missing_usage_is_estimated_off_the_hot_path_and_the_text_is_not_kept(
    recorder: Recorder,
) -> None:
    data = make_call(estimate=(PROMPT, COMPLETION), usage_source=UsageSource.NONE)
    record_call(data)
    assert recorder.flush()

    row = CallRecord.objects.get()
    assert row.prompt_tokens == estimate_tokens(PROMPT) > 0
    assert row.completion_tokens == estimate_tokens(COMPLETION) > 0
    assert row.total_tokens == row.prompt_tokens + row.completion_tokens
    assert row.usage_source == UsageSource.ESTIMATED
    assert row.cost_usd is not None and row.cost_usd > 0
    assert data.estimate is None
    stored = CallRecord.objects.values().get()
    assert not any("France" in str(value) for value in stored.values())
    assert "France" not in repr(data)


def test_odd_values_are_coerced_instead_of_blocking_the_batch(recorder: Recorder) -> None:
    record_call(
        make_call(
            request_id="odd",
            upstream_model="m" * 500,
            prompt_tokens=-3,
            latency_ms=float("nan"),
            ttft_ms=float("inf"),
        )
    )
    record_call(make_call(request_id="normal"))
    assert recorder.flush()
    odd = CallRecord.objects.get(request_id="odd")
    assert len(odd.upstream_model) == 200
    assert (odd.prompt_tokens, odd.latency_ms, odd.ttft_ms) == (0, 0.0, None)
    assert CallRecord.objects.filter(request_id="normal").exists()


def test_calls_recorded_from_many_threads_are_all_written_once(
    make_recorder: Callable[..., Recorder],
) -> None:
    recorder = make_recorder(batch_size=50, flush_seconds=0.05)

    def worker(n: int) -> None:
        for i in range(100):
            recorder.record(make_call(request_id=f"t{n}-{i}"))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert recorder.flush()
    ids = list(CallRecord.objects.values_list("request_id", flat=True))
    assert len(ids) == len(set(ids)) == 800


def test_a_pass_settles_its_records_limits_in_one_call_before_writing_them(
    recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One call to the limiter per pass, whatever the number of records (a Redis round trip
    each would cost the worker a core's share at high traffic), made before the batch is
    written, so that a written record is a settled one."""
    import asyncio
    import time as clock

    from keys.limits import Estimate, LimitSpec, Reservation, Settlement, get_limiter, spec_meters

    limiter = get_limiter()
    spec = LimitSpec(id=77, client="app", tokens_per_minute=100_000)
    meters = spec_meters(spec, Estimate(tokens=100), now=clock.time(), zone="UTC")
    calls: list[tuple[int, int]] = []
    settle = limiter.settle

    def counting(settlements: list[Settlement]) -> list[int | None]:
        calls.append((len(settlements), CallRecord.objects.count()))
        return settle(settlements)

    monkeypatch.setattr(limiter, "settle", counting)
    assert recorder.flush()  # the flusher is up and idle: the ten records make one pass
    for i in range(10):
        decision = asyncio.run(limiter.reserve(meters, (), lease_id=f"r{i}", lease_until=0.0))
        data = make_call(request_id=f"req-{i}", prompt_tokens=20, completion_tokens=10)
        data.final, data.limits = True, Reservation(decision)
        recorder.record(data)
    assert recorder.flush()
    assert calls == [(10, 0)]  # one call, ten settlements, nothing written yet
    reading = limiter.read([meters[0].key], [], now=clock.time())
    assert reading.used == (10 * 30,)  # each reserved 100, used 30
