"""GET /metrics: the Prometheus text format, for a `monitor` token or the scrape token.

Two kinds of series meet here (docs/observability.md):

- what the processes of this host counted (common.metrics: traffic, tokens, cost, latencies,
  failovers, key transitions, the recorder), summed over the files of prometheus-client's
  multiprocess mode;
- gauges of shared state, read where the state lives at each scrape (`SharedStateCollector`):
  keys by state, calls in flight, cooldown timers, headroom, breakers, the last successful
  probe. The key and breaker stores are shared when scaled out, so every host reports the same
  values: aggregate them with max(), not sum().
"""

from __future__ import annotations

import hmac
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import close_old_connections
from django.http import Http404, HttpRequest, HttpResponse
from ninja import Router
from ninja.security import HttpBearer
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from common import metrics, telemetry
from healthchecks.breaker import BreakerStatus
from healthchecks.selectors import endpoint_health_list, probe_last_success
from keys.auth import monitor_auth
from keys.health import KeyStatus
from keys.selectors import KeyHealth, keys_health

logger = logging.getLogger("llmrotate.metrics")

router = Router(tags=["monitoring"])

Sample = tuple[dict[str, str], float]


def _version() -> str:
    try:
        return version("llmrotate")
    except PackageNotFoundError:  # pragma: no cover - a checkout run without installing
        return "unknown"


_VERSION = _version()


def _timer(key: KeyHealth) -> float | None:
    """Epoch seconds when a key that cannot take calls comes back by itself (None: never)."""
    until = {
        KeyStatus.COOLDOWN.value: key.cooldown_until,
        KeyStatus.EXHAUSTED.value: key.exhausted_until,
        KeyStatus.QUARANTINED.value: key.quarantine_until,
    }.get(key.health)
    return until.timestamp() if until is not None else None


def key_samples(now: float) -> dict[str, list[Sample]]:
    keys = keys_health(now=now)
    per_key = ("in_flight", "returns_in_seconds", "remaining_requests", "remaining_tokens")
    out: dict[str, list[Sample]] = {f"llmrotate_key_{name}": [] for name in per_key}
    per_state: dict[tuple[str, str], int] = {}
    available: dict[str, int] = {}
    for key in keys:
        for state in KeyStatus:
            per_state.setdefault((key.provider, state.value), 0)
        per_state[(key.provider, key.health)] = per_state.get((key.provider, key.health), 0) + 1
        available[key.provider] = available.get(key.provider, 0) + key.available
        ids = {"provider": key.provider, "key_id": key.key_id}
        out["llmrotate_key_in_flight"].append((ids, float(key.in_flight)))
        if key.available:
            out["llmrotate_key_returns_in_seconds"].append((ids, 0.0))
        elif (until := _timer(key)) is not None:
            out["llmrotate_key_returns_in_seconds"].append((ids, max(0.0, until - now)))
        if key.remaining_requests is not None:
            out["llmrotate_key_remaining_requests"].append((ids, float(key.remaining_requests)))
        if key.remaining_tokens is not None:
            out["llmrotate_key_remaining_tokens"].append((ids, float(key.remaining_tokens)))
    out["llmrotate_keys"] = [
        ({"provider": p, "state": s}, float(n)) for (p, s), n in sorted(per_state.items())
    ]
    out["llmrotate_keys_available"] = [
        ({"provider": p}, float(n)) for p, n in sorted(available.items())
    ]
    return out


def breaker_samples() -> list[Sample]:
    samples = []
    for entry in endpoint_health_list():
        current = entry.health.breaker_state
        for state in BreakerStatus:
            labels = {"endpoint": entry.health.endpoint, "state": state.value}
            samples.append((labels, 1.0 if state.value == current else 0.0))
    return samples


def probe_samples() -> list[Sample]:
    return [
        ({"endpoint": endpoint, "kind": kind}, at) for endpoint, kind, at in probe_last_success()
    ]


# name -> (help, labels): the one list of the scrape-time gauges and their labels.
SHARED_STATE_HELP: dict[str, tuple[str, tuple[str, ...]]] = {
    "llmrotate_keys": ("Keys per provider and state.", ("provider", "state")),
    "llmrotate_keys_available": ("Keys that can take a call now.", ("provider",)),
    "llmrotate_key_in_flight": ("Calls in flight on a key.", ("provider", "key_id")),
    "llmrotate_key_returns_in_seconds": (
        "Seconds until a key that cannot take calls comes back by itself (0: available;"
        " absent: only a person or a re-check brings it back).",
        ("provider", "key_id"),
    ),
    "llmrotate_key_remaining_requests": (
        "Requests left in the key's window, as the upstream last reported.",
        ("provider", "key_id"),
    ),
    "llmrotate_key_remaining_tokens": (
        "Tokens left in the key's window, as the upstream last reported.",
        ("provider", "key_id"),
    ),
    "llmrotate_circuit_breaker_state": (
        "1 for the endpoint's breaker state (closed, open, half_open), 0 for the others.",
        ("endpoint", "state"),
    ),
    "llmrotate_probe_last_success_timestamp_seconds": (
        "When a probe of the endpoint last succeeded (unix time); stops moving when the beat"
        " or the worker stop.",
        ("endpoint", "kind"),
    ),
    "llmrotate_build_info": ("The gateway's version.", ("version",)),
}
# What the assets in docs/observability/ may refer to besides common.metrics' catalogue.
SHARED_STATE_GAUGES = tuple(SHARED_STATE_HELP)


def shared_state_samples(now: float) -> dict[str, list[Sample]]:
    """The gauges read from the stores at scrape time. A store that cannot be read (Redis or
    the database away) leaves its gauges out of this scrape, never the whole scrape: the
    counters matter most during an outage (the limiter's errors, the recorder's spool)."""
    samples: dict[str, list[Sample]] = {}
    for read in (
        lambda: key_samples(now),
        lambda: {"llmrotate_circuit_breaker_state": breaker_samples()},
        lambda: {"llmrotate_probe_last_success_timestamp_seconds": probe_samples()},
    ):
        try:
            samples.update(read())
        except Exception as exc:
            logger.warning("a shared-state gauge is left out of this scrape: %r", exc)
    samples["llmrotate_build_info"] = [({"version": _VERSION}, 1.0)]
    return samples


class SharedStateCollector(Collector):
    def collect(self) -> Iterator[GaugeMetricFamily]:
        for name, samples in shared_state_samples(time.time()).items():
            doc, labels = SHARED_STATE_HELP[name]
            family = GaugeMetricFamily(name, doc, labels=labels)
            for values, value in samples:
                family.add_metric([values[label] for label in labels], value)
            yield family


_LIVE_FILE = re.compile(r"^gauge_live\w+?_(\d+)\.db$")


def forget_dead_processes(directory: Path) -> None:
    """Drop the per-process gauges (the recorder's queue) of processes that are gone, so a
    worker uvicorn replaced no longer adds its last queue to the sum. Their counters stay:
    dropping them would make the sums go backwards."""
    dead = set()
    for path in directory.glob("gauge_live*.db"):
        match = _LIVE_FILE.match(path.name)
        if match and not _alive(int(match.group(1))):
            dead.add(int(match.group(1)))
    for pid in dead:
        mark_process_dead(pid, str(directory))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def exposition() -> bytes:
    directory = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    forget_dead_processes(directory)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))
    registry.register(SharedStateCollector())
    return generate_latest(registry)


class ScrapeTokenAuth(HttpBearer):
    """LLMROTATE_METRICS_TOKEN, for a Prometheus that should not hold a client token."""

    def authenticate(self, request: HttpRequest, token: str) -> bool | None:
        expected = settings.LLMROTATE_METRICS_TOKEN
        if expected and hmac.compare_digest(token.encode(), expected.encode()):
            return True
        return None  # the next method (a monitor token) decides


@router.get("/metrics", auth=[ScrapeTokenAuth(), *monitor_auth], include_in_schema=False)
async def metrics_scrape(request: HttpRequest) -> HttpResponse:
    if not metrics.ON:
        raise Http404("metrics are switched off (LLMROTATE_METRICS)")
    body = await sync_to_async(exposition)()
    # 0.0.4: the text format every Prometheus reads (2.x as well as 3.x); our names need none
    # of 1.0.0's escaping.
    return HttpResponse(body, content_type=CONTENT_TYPE_PLAIN_0_0_4)


_otel_registered = False
_otel_lock = threading.Lock()
_otel_cache: tuple[float, dict[str, list[Sample]]] = (0.0, {})


def _otel_samples(name: str) -> list[Sample]:
    """One read of the shared state per collection, not one per gauge: the reader calls the
    callbacks one after the other."""
    global _otel_cache
    with _otel_lock:
        at, samples = _otel_cache
        now = time.time()
        if now - at > 1.0:
            try:
                samples = shared_state_samples(now)
            finally:
                close_old_connections()  # the reader's own thread: not a request's
            _otel_cache = (now, samples)
    return samples.get(name, [])


def otel_gauges_register() -> None:
    """The same shared-state gauges through OpenTelemetry's metrics API, read when its
    reader collects (a no-op without the `otel` extra configured). Once per process."""
    global _otel_registered
    if _otel_registered:
        return
    _otel_registered = True

    def callback(name: str) -> Callable[[], Iterable[tuple[float, dict[str, Any]]]]:
        def observe() -> Iterable[tuple[float, dict[str, Any]]]:
            return [(value, labels) for labels, value in _otel_samples(name)]

        return observe

    for name, (doc, _labels) in SHARED_STATE_HELP.items():
        telemetry.register_observable_gauge(name, doc, callback(name))
