"""The recorder's own series: batches and records written, failed writes, records spooled and
replayed, records dropped (which only an unreadable spool file can cause), the queue depth;
and the traffic series it counts from each record it prepares.

The counters are the process's (prometheus-client's multiprocess files), shared with every
other test: each check compares a reading before and after.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

import usage.recorder as recorder_module
from common import metrics
from llmrotate_site.metrics import forget_dead_processes
from tests.usage.conftest import FlakyWrites, make_call
from usage.models import CallRecord
from usage.recorder import Recorder
from usage.spool import spool_write

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _quiet_process_recorder() -> None:
    """The process's own recorder must have nothing left to write while a test reads the
    process-wide counters (what an earlier test queued would be counted in between), and no
    thread: each of its passes sets the queue gauge to its own backlog, over the test
    recorder's. A later record starts it again."""
    from usage.recorder import get_recorder

    assert get_recorder().stop(timeout=10)


def reading(instrument: metrics._Instrument, *labels: str) -> float:
    """One series as a scrape adds it up over this host's processes."""
    directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    forget_dead_processes(Path(directory))  # earlier runs' queues, as a scrape drops them
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=directory)
    wanted = dict(zip(instrument.labels, labels, strict=True))
    suffix = "_total" if instrument.kind == "counter" else ""
    for family in registry.collect():
        for sample in family.samples:
            if sample.name == instrument.name + suffix and sample.labels == wanted:
                return float(sample.value)
    return 0.0


def test_written_batches_and_records_are_counted(
    make_recorder: Callable[..., Recorder], monkeypatch: pytest.MonkeyPatch
) -> None:
    written: list[int] = []
    real_write = recorder_module.calls_write

    def counting_write(records: list[CallRecord]) -> None:
        real_write(records)
        written.append(len(records))

    monkeypatch.setattr(recorder_module, "calls_write", counting_write)
    batches, records = reading(metrics.RECORDER_BATCHES), reading(metrics.RECORDER_RECORDS)
    recorder = make_recorder(batch_size=4)
    for i in range(10):
        recorder.record(make_call(request_id=f"req-{i}"))
    assert recorder.flush()
    assert reading(metrics.RECORDER_RECORDS) - records == sum(written) == 10
    # As many as were committed: at most 4 records each, however the flusher's wake-ups fell.
    assert reading(metrics.RECORDER_BATCHES) - batches == len(written) >= 3
    assert reading(metrics.RECORDER_QUEUE) == 0


def test_failures_spooling_and_replay_are_counted_and_nothing_is_dropped(
    make_recorder: Callable[..., Recorder], flaky_writes: Callable[..., FlakyWrites]
) -> None:
    before = {
        name: reading(getattr(metrics, name))
        for name in ("RECORDER_FAILURES", "RECORDER_SPOOLED", "RECORDER_REPLAYED")
    }
    dropped = reading(metrics.RECORDER_DROPPED)
    flaky = flaky_writes(down=True)
    recorder = make_recorder(buffer_max=10)
    for i in range(25):
        recorder.record(make_call(request_id=f"req-{i:02d}"))
    assert not recorder.flush(timeout=0.5)
    # The failed pass may still be spooling (fsync'd files) when the flush gives up: its
    # figures are set at its end, so they are waited for.
    deadline = time.monotonic() + 10
    while reading(metrics.RECORDER_QUEUE) != recorder.backlog:
        assert time.monotonic() < deadline, "the failed pass never ended"
        time.sleep(0.01)
    failures = reading(metrics.RECORDER_FAILURES) - before["RECORDER_FAILURES"]
    spooled = reading(metrics.RECORDER_SPOOLED) - before["RECORDER_SPOOLED"]
    assert failures >= 1
    assert spooled == 25 - recorder.backlog and spooled > 0
    # What is held in memory shows as the queue, until it is written.
    assert reading(metrics.RECORDER_QUEUE) == recorder.backlog

    flaky.down = False
    assert recorder.flush()
    assert reading(metrics.RECORDER_REPLAYED) - before["RECORDER_REPLAYED"] == spooled
    assert reading(metrics.RECORDER_DROPPED) == dropped
    assert reading(metrics.RECORDER_QUEUE) == 0


def test_an_unreadable_spool_file_counts_its_lines_as_dropped(
    make_recorder: Callable[..., Recorder], spool_dir: Path
) -> None:
    dropped = reading(metrics.RECORDER_DROPPED)
    path = spool_write(spool_dir=spool_dir, rows=[])
    path.write_text('{"not": "a record"}\nnot json at all\n')
    recorder = make_recorder()
    recorder.record(make_call())
    assert recorder.flush()
    assert list(spool_dir.glob("*.corrupt"))
    assert reading(metrics.RECORDER_DROPPED) - dropped == 2


def test_traffic_series_are_counted_from_each_prepared_record(
    make_recorder: Callable[..., Recorder],
) -> None:
    route, labels = "metrics-route", ("metrics-route", "openai-main", "gpt-4o-mini", "client-a")
    prompt = reading(metrics.TOKENS, *labels, "prompt")
    cost = reading(metrics.COST, *labels)
    requests = reading(metrics.REQUESTS, route, "client-a", "success", "2xx", "false")
    unavailable = reading(metrics.REQUESTS, route, "client-a", "unavailable", "5xx", "false")
    attempts = reading(
        metrics.ATTEMPTS, route, "openai-main", "gpt-4o-mini", "openai-1", "success", "2xx", "false"
    )
    recorder = make_recorder()
    common = {"requested_model": route, "prompt_tokens": 100, "completion_tokens": 10}
    recorder.record(make_call(request_id="m-1", final=True, client_status=200, **common))
    # A flagged usage is kept out of the token and cost series, as out of the rollups.
    recorder.record(make_call(request_id="m-2", usage_flagged=True, **common))
    # A request no upstream was tried for: a request, not an attempt.
    recorder.record(
        make_call(
            request_id="m-3",
            attempt=0,
            final=True,
            client_status=503,
            outcome="unavailable",
            requested_model=route,
            provider="",
            upstream_model="",
            key_id="",
        )
    )
    assert recorder.flush()
    assert reading(metrics.REQUESTS, route, "client-a", "success", "2xx", "false") - requests == 1
    assert (
        reading(metrics.REQUESTS, route, "client-a", "unavailable", "5xx", "false") - unavailable
        == 1
    )
    after = reading(
        metrics.ATTEMPTS, route, "openai-main", "gpt-4o-mini", "openai-1", "success", "2xx", "false"
    )
    assert after - attempts == 2
    assert reading(metrics.TOKENS, *labels, "prompt") - prompt == 100
    from usage.models import CallRecord

    priced = CallRecord.objects.get(request_id="m-1").cost_usd
    assert priced is not None and priced > Decimal(0)
    assert reading(metrics.COST, *labels) - cost == pytest.approx(float(priced))


def test_nothing_is_counted_with_metrics_off(
    make_recorder: Callable[..., Recorder], monkeypatch: pytest.MonkeyPatch
) -> None:
    route = "metrics-off-route"
    monkeypatch.setattr(metrics, "ON", False)
    recorder = make_recorder()
    recorder.record(make_call(request_id="off-1", requested_model=route, final=True))
    assert recorder.flush()
    assert reading(metrics.REQUESTS, route, "client-a", "success", "none", "false") == 0


def test_a_pass_through_call_is_counted_under_its_pattern_not_the_clients_names() -> None:
    from usage.call_metrics import call_observe

    labels = ("ollama/*", "openai-main", "*", "openai-1", "success", "2xx", "false")
    before = reading(metrics.ATTEMPTS, *labels)
    call_observe(
        make_call(requested_model="ollama/x-1", upstream_model="x-1", metric_route="ollama/*",
                  metric_model="*")
    )  # fmt: skip
    assert reading(metrics.ATTEMPTS, *labels) == before + 1
    unbounded = ("ollama/x-1", "openai-main", "x-1", "openai-1", "success", "2xx", "false")
    assert reading(metrics.ATTEMPTS, *unbounded) == 0
