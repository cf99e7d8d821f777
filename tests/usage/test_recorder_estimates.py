"""Token estimates in the recorder: bounded work, on a thread of their own, nothing lost."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import usage.recorder as recorder_module
import usage.tokens as tokens
from tests.usage.conftest import make_call, wait_until
from usage.models import CallRecord, UsageSource
from usage.recorder import Recorder, record_call
from usage.tokens import estimate_tokens

pytestmark = pytest.mark.django_db(transaction=True)

WORDS = "the quick brown fox jumps over the lazy dog. "
SLOW = "<slow>"  # an encoder call on a text with this waits for the gate


class GatedEncoder:
    """The real encoder, counting the characters it is given, and holding any text that
    contains SLOW until the gate opens."""

    def __init__(self) -> None:
        encoder = tokens._get_encoder()
        assert encoder is not None
        self.real = encoder
        self.chars = 0
        self.gate = threading.Event()
        self.held = threading.Event()

    def encode_ordinary(self, text: str) -> list[int]:
        self.chars += len(text)
        if SLOW in text:
            self.held.set()
            self.gate.wait(30)
        return self.real.encode_ordinary(text)


def stop_while_held(recorder: Recorder, encoder: GatedEncoder) -> bool:
    """`recorder.stop()` from another thread while the encoder holds a record: the gate opens
    once the estimator has been detached. What stop returned."""
    result: list[bool] = []
    stopping = threading.Thread(target=lambda: result.append(recorder.stop(timeout=20)))
    stopping.start()
    wait_until(lambda: recorder._estimator is None)
    encoder.gate.set()
    stopping.join(30)
    return result == [True]


@pytest.fixture
def encoder(monkeypatch: pytest.MonkeyPatch) -> Iterator[GatedEncoder]:
    gated = GatedEncoder()
    monkeypatch.setitem(tokens._encoders, tokens.ENCODING_NAME, gated)
    yield gated
    gated.gate.set()  # never leave a thread waiting on it


def test_a_20_mb_estimate_tokenizes_at_most_the_cap_of_each_text_and_says_so(
    recorder: Recorder, encoder: GatedEncoder, settings: Any
) -> None:
    settings.LLMROTATE_ESTIMATE_MAX_CHARS = 65536
    completion = WORDS * (20_000_000 // len(WORDS))
    record_call(make_call(estimate=(WORDS * 50_000, completion)))
    assert recorder.flush(timeout=30)

    assert encoder.chars <= 2 * 65536
    row = CallRecord.objects.get()
    assert row.usage_source == UsageSource.EXTRAPOLATED
    per_copy = estimate_tokens(WORDS * 1000) / 1000
    expected = per_copy * len(completion) / len(WORDS)
    assert abs(row.completion_tokens - expected) / expected < 0.02
    assert row.total_tokens == row.prompt_tokens + row.completion_tokens
    assert row.cost_usd is not None and row.cost_usd > 0


def test_texts_the_proxy_cut_are_scaled_to_their_full_length(recorder: Recorder) -> None:
    kept = WORDS * 100
    record_call(make_call(estimate=(kept, kept), estimate_chars=(len(kept) * 10, len(kept) * 50)))
    assert recorder.flush()
    row = CallRecord.objects.get()
    assert row.usage_source == UsageSource.EXTRAPOLATED
    assert (row.prompt_tokens, row.completion_tokens) == (
        estimate_tokens(kept) * 10,
        estimate_tokens(kept) * 50,
    )


def test_a_slow_estimate_does_not_hold_back_the_records_recorded_after_it(
    make_recorder: Callable[..., Recorder], encoder: GatedEncoder
) -> None:
    recorder = make_recorder(flush_seconds=0.05)
    recorder.record(make_call(request_id="slow", estimate=(SLOW, "")))
    wait_until(encoder.held.is_set)
    recorder.record(make_call(request_id="plain", prompt_tokens=10, completion_tokens=5))

    wait_until(lambda: CallRecord.objects.filter(request_id="plain").exists())
    assert not CallRecord.objects.filter(request_id="slow").exists()  # still being estimated

    encoder.gate.set()
    wait_until(lambda: CallRecord.objects.filter(request_id="slow").exists())
    assert CallRecord.objects.get(request_id="slow").usage_source == UsageSource.ESTIMATED


def test_flush_does_not_report_success_before_an_earlier_estimate_is_written(
    recorder: Recorder, encoder: GatedEncoder
) -> None:
    record_call(make_call(request_id="slow", estimate=(SLOW, "")))
    wait_until(encoder.held.is_set)
    assert not recorder.flush(timeout=0.3)
    assert not CallRecord.objects.exists()

    encoder.gate.set()
    assert recorder.flush()
    assert CallRecord.objects.get().request_id == "slow"


def test_a_stop_writes_every_record_still_waiting_for_its_estimate_exactly_once(
    make_recorder: Callable[..., Recorder], encoder: GatedEncoder
) -> None:
    recorder = make_recorder()
    recorder.record(make_call(request_id="in-hand", estimate=(SLOW, "")))
    wait_until(encoder.held.is_set)
    for i in range(3):
        recorder.record(make_call(request_id=f"queued-{i}", estimate=(WORDS, WORDS)))
    # The estimator is detached (its queue handed to the flusher) while it holds "in-hand".
    assert stop_while_held(recorder, encoder)
    rows = list(CallRecord.objects.values_list("request_id", "prompt_tokens", "usage_source"))
    assert sorted(request_id for request_id, _, _ in rows) == [
        "in-hand",
        "queued-0",
        "queued-1",
        "queued-2",
    ]
    assert all(tokens > 0 and source == UsageSource.ESTIMATED for _, tokens, source in rows)
    assert recorder.backlog == 0


def test_a_burst_of_records_wakes_the_estimator_per_batch_not_per_record(
    make_recorder: Callable[..., Recorder], monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = make_recorder()
    recorder.record(make_call(request_id="first", estimate=(WORDS, WORDS)))  # starts the thread
    assert recorder.flush()
    wakes = 0
    notify = recorder._estimate_cond.notify_all

    def counted() -> None:
        nonlocal wakes
        wakes += 1
        notify()

    monkeypatch.setattr(recorder._estimate_cond, "notify_all", counted)
    for i in range(300):
        recorder.record(make_call(request_id=f"burst-{i}", estimate=(WORDS, WORDS)))
    assert recorder.flush()
    assert CallRecord.objects.filter(request_id__startswith="burst-").count() == 300
    # One wake when a batch starts and one when it is full, plus the flush's: 300 records
    # arriving at once make a handful of batches.
    assert wakes <= 2 * (300 // recorder_module.ESTIMATE_BATCH + 1) + 1, wakes


# The bug ends the estimator thread (a later record starts a new one), as it would in production.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_bug_counting_one_record_of_a_batch_loses_none_of_the_batch(
    make_recorder: Callable[..., Recorder], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = recorder_module.call_count_tokens

    def buggy(data: Any) -> None:
        if data.request_id == "bad":
            raise RuntimeError("a bug in counting")
        real(data)

    monkeypatch.setattr(recorder_module, "call_count_tokens", buggy)
    recorder = make_recorder()
    ids = ["a", "b", "bad", "c", "d"]
    for request_id in ids:
        recorder.record(make_call(request_id=request_id, estimate=(WORDS, WORDS)))
    assert recorder.flush()
    rows = dict(CallRecord.objects.values_list("request_id", "prompt_tokens"))
    assert sorted(rows) == sorted(ids)  # each exactly once
    assert all(tokens > 0 for tokens in rows.values())  # the flusher counted what was left


def test_a_stop_leaves_the_estimator_one_record_in_hand_however_big_its_batch(
    make_recorder: Callable[..., Recorder],
    encoder: GatedEncoder,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    counted_by_estimator: list[str] = []
    real = recorder_module.call_count_tokens

    def counting(data: Any) -> None:
        if threading.current_thread().name == "llmrotate-estimator":
            counted_by_estimator.append(data.request_id)
        real(data)

    monkeypatch.setattr(recorder_module, "call_count_tokens", counting)
    recorder = make_recorder()
    ids = [f"batch-{i}" for i in range(10)]
    for request_id in ids:  # within one gathering: one batch
        recorder.record(make_call(request_id=request_id, estimate=(SLOW, "")))
    wait_until(encoder.held.is_set)
    assert stop_while_held(recorder, encoder)
    assert counted_by_estimator == ["batch-0"]  # the rest went to the flusher, which counted it
    assert sorted(CallRecord.objects.values_list("request_id", flat=True)) == ids
    assert recorder.backlog == 0
