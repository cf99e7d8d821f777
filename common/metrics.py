"""The gateway's Prometheus series (and their OpenTelemetry twins), in one catalogue.

Every layer counts through the instruments defined here; `GET /metrics`
(llmrotate_site/metrics.py) exposes them. docs/observability.md lists each series, its labels
and what it is for.

Why prometheus-client's multiprocess mode: a host runs several processes (uvicorn workers, the
Celery worker), and a scrape reaches one of them. Each process writes its counters to its own
memory-mapped file in LLMROTATE_METRICS_DIR (set as PROMETHEUS_MULTIPROC_DIR by the settings,
before this module imports prometheus_client), and the scrape sums the files. A worker that
dies leaves its file, so a sum never goes backwards when uvicorn replaces it; only a restart
of the whole gateway (`serve` empties the directory) starts every series at zero again, which
Prometheus' rate() reads as the one counter reset it is. Deriving counters from shared state
instead (Redis, the database) would put a write on every request; the files cost a
memory-mapped store per update, and updates mostly happen on the recorder's thread.

Gauges of shared state (keys by state, breakers, the last successful probe) are not counted
here: the scrape reads them where they live (llmrotate_site/metrics.py), so every process and
host reports the same truth.

Label values are bounded by the configuration (routes, providers, models, keys, client names)
or by small enums (outcomes, status classes); never a request id, a token or free text.

With LLMROTATE_METRICS off every update returns at once. With the `otel` extra configured
(common.telemetry), every series has an OpenTelemetry twin of the same name: counters and the
gauge are observable instruments that read this process's values when OpenTelemetry exports
(nothing more per update: an SDK update costs several times a Prometheus one); histograms,
which OpenTelemetry cannot observe, get each observation too (`.otel`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from django.conf import settings

_DIR = Path(os.environ.get("PROMETHEUS_MULTIPROC_DIR") or settings.LLMROTATE_METRICS_DIR)
os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(_DIR)
_DIR.mkdir(parents=True, exist_ok=True)

import prometheus_client  # noqa: E402  (reads PROMETHEUS_MULTIPROC_DIR when imported)

ON: bool = settings.LLMROTATE_METRICS

# Seconds. LLM calls span four orders of magnitude: a cached answer in a few milliseconds, a
# long stream in minutes.
LLM_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0,
    60.0, 120.0, 300.0, 600.0,
)  # fmt: skip
# The gateway's own time per attempt: tens of microseconds to tens of milliseconds.
OVERHEAD_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
)  # fmt: skip

_instruments: list[_Instrument] = []


class _Instrument:
    kind = ""

    def __init__(self, name: str, doc: str, labels: Sequence[str], *, unit: str = "") -> None:
        self.name = name
        self.doc = doc
        self.labels = tuple(labels)
        self.unit = unit
        self.prom: Any = None
        self.otel: Any = None  # the OpenTelemetry instrument, once common.telemetry binds one
        _instruments.append(self)

    def _attrs(self, values: tuple[str, ...]) -> dict[str, str]:
        return dict(zip(self.labels, values, strict=True))

    def readings(self) -> list[tuple[float, dict[str, str]]]:
        """This process's values by label set, for an OpenTelemetry observable instrument to
        report at each export (common.telemetry)."""
        sample = self.name + ("_total" if self.kind == "counter" else "")
        return [
            (s.value, dict(s.labels))
            for family in self.prom.collect()
            for s in family.samples
            if s.name == sample
        ]


class Counter(_Instrument):
    kind = "counter"

    def __init__(self, name: str, doc: str, labels: Sequence[str] = (), **kw: Any) -> None:
        super().__init__(name, doc, labels, **kw)
        self.prom = prometheus_client.Counter(name, doc, self.labels)

    def inc(self, *values: str, amount: float = 1.0) -> None:
        if not ON or amount <= 0:
            return
        (self.prom.labels(*values) if values else self.prom).inc(amount)
        if self.otel is not None:
            self.otel.add(amount, self._attrs(values))


class Histogram(_Instrument):
    kind = "histogram"

    def __init__(
        self, name: str, doc: str, labels: Sequence[str], *, buckets: Sequence[float], **kw: Any
    ) -> None:
        super().__init__(name, doc, labels, unit="s", **kw)
        self.buckets = tuple(buckets)
        self.prom = prometheus_client.Histogram(name, doc, self.labels, buckets=self.buckets)

    def observe(self, seconds: float | None, *values: str) -> None:
        if not ON or seconds is None or seconds < 0:
            return
        self.prom.labels(*values).observe(seconds)
        if self.otel is not None:
            self.otel.record(seconds, self._attrs(values))


class Gauge(_Instrument):
    """A figure of this process (the recorder's queue): the scrape adds those of the live
    processes; a dead process's last value is dropped (llmrotate_site/metrics.py)."""

    kind = "gauge"

    def __init__(self, name: str, doc: str, labels: Sequence[str] = (), **kw: Any) -> None:
        super().__init__(name, doc, labels, **kw)
        self.prom = prometheus_client.Gauge(name, doc, self.labels, multiprocess_mode="livesum")

    def set(self, value: float, *values: str) -> None:
        if not ON:
            return
        (self.prom.labels(*values) if values else self.prom).set(value)
        if self.otel is not None:
            self.otel.set(value, self._attrs(values))


def instruments() -> list[_Instrument]:
    return list(_instruments)


def status_class(status: int | None) -> str:
    """The class ("2xx" … "5xx"), or "none" when no status came back (a timeout, a reset)."""
    if status is None or not 100 <= status <= 599:
        return "none"
    return f"{status // 100}xx"


def seconds(ms: float | None) -> float | None:
    return None if ms is None else ms / 1000.0


# --- Traffic (counted from the call records, on the recorder's thread) ----------------------

REQUESTS = Counter(
    "llmrotate_requests",
    "Client requests answered, by the outcome of the attempt that ended them and the HTTP"
    " status class the client got.",
    ("route", "client", "outcome", "status_class", "stream"),
)
ATTEMPTS = Counter(
    "llmrotate_attempts",
    "Upstream attempts (one per key tried), by outcome and the upstream's status class.",
    ("route", "provider", "upstream_model", "key_id", "outcome", "status_class", "stream"),
)
TOKENS = Counter(
    "llmrotate_tokens",
    "Tokens of answered attempts, by type: prompt, completion, cached (read from the"
    " provider's cache), cache_write, reasoning.",
    ("route", "provider", "upstream_model", "client", "type"),
)
COST = Counter(
    "llmrotate_cost_usd",
    "Cost in US dollars, from the price list (usage/pricing.py).",
    ("route", "provider", "upstream_model", "client"),
)
REQUEST_DURATION = Histogram(
    "llmrotate_request_duration_seconds",
    "Client requests, from arrival to the last byte of the answer (failovers included).",
    ("route", "stream", "status_class"),
    buckets=LLM_BUCKETS,
)
ATTEMPT_DURATION = Histogram(
    "llmrotate_attempt_duration_seconds",
    "Upstream attempts, from sending to the last byte.",
    ("route", "provider", "upstream_model", "stream"),
    buckets=LLM_BUCKETS,
)
TTFT = Histogram(
    "llmrotate_time_to_first_token_seconds",
    "Streamed attempts: from the request's arrival to the first content chunk.",
    ("route", "provider", "upstream_model"),
    buckets=LLM_BUCKETS,
)
TTLT = Histogram(
    "llmrotate_time_to_last_token_seconds",
    "Answered attempts: from the request's arrival to the last byte of the answer.",
    ("route", "provider", "upstream_model", "stream"),
    buckets=LLM_BUCKETS,
)
OVERHEAD = Histogram(
    "llmrotate_gateway_overhead_seconds",
    "Time the gateway itself spent on an attempt (auth, parsing, routing, encoding, relaying).",
    ("route", "stream"),
    buckets=OVERHEAD_BUCKETS,
)

# --- Failover (counted by the engine as it moves on) ----------------------------------------

ROTATIONS = Counter(
    "llmrotate_key_rotations",
    "A request moved on to another key of the same deployment, by why the last one failed.",
    ("route", "provider", "reason"),
)
FAILOVERS = Counter(
    "llmrotate_failovers",
    "A request moved on to another deployment (provider or model), by why the last one failed.",
    ("route", "from_provider", "to_provider", "reason"),
)
KEY_TRANSITIONS = Counter(
    "llmrotate_key_state_transitions",
    "Key health changes: from and to a state (active, cooldown, exhausted, quarantined,"
    " probing, disabled), and the reason (the call outcome, recheck_ok, recheck_failed,"
    " manual_*).",
    ("key_id", "from", "to", "reason"),
)

# --- Limits (counted by the proxy as it refuses, and by the limiter when Redis fails it) ----

LIMITED = Counter(
    "llmrotate_limited_requests",
    "Requests refused by the gateway's own limits, by the kind of limit (requests, tokens, usd,"
    " concurrency) and its period (minute, day, month, or none for concurrency).",
    ("route", "kind", "period"),
)
LIMITER_ERRORS = Counter(
    "llmrotate_limiter_errors",
    "Calls of the limiter that could not reach its Redis; requests were then admitted (fail"
    " open) or refused (fail closed) as LLMROTATE_LIMITS_FAIL_OPEN says.",
    ("error",),
)

# --- The recorder ---------------------------------------------------------------------------

RECORDER_QUEUE = Gauge(
    "llmrotate_recorder_queue_depth",
    "Call records held in memory, not yet written (all live processes of this host).",
)
RECORDER_BATCHES = Counter(
    "llmrotate_recorder_batches_written", "Batches of call records committed to the database."
)
RECORDER_RECORDS = Counter(
    "llmrotate_recorder_records_written", "Call records committed to the database."
)
RECORDER_FAILURES = Counter(
    "llmrotate_recorder_write_failures", "Failed writes of a batch (each is retried)."
)
RECORDER_SPOOLED = Counter(
    "llmrotate_recorder_records_spooled",
    "Call records spooled to disk while the database was away.",
)
RECORDER_REPLAYED = Counter(
    "llmrotate_recorder_records_replayed", "Spooled call records written back to the database."
)
CAPTURE_WRITTEN = Counter(
    "llmrotate_capture_exchanges_written",
    "Wire-captured exchanges (one leg of one request) appended to capture files.",
)
CAPTURE_DROPPED = Counter(
    "llmrotate_capture_exchanges_dropped",
    "Wire-captured exchanges not written, by reason: queue_full, paused (after a failed "
    "write), write_failed, encode_failed.",
    ["reason"],
)
RECORDER_DROPPED = Counter(
    "llmrotate_recorder_records_dropped",
    "Call records lost: neither written nor spooled (a spool write that failed). Must stay 0.",
)
