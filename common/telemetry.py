"""OpenTelemetry traces and metrics, when the `otel` extra is installed and asked for.

Everything the gateway does with OpenTelemetry goes through this module. `configure` runs once
per process (the ASGI lifespan's startup); until it has turned tracing on, every hook below
returns after one `None` check, and nothing of OpenTelemetry is imported: not the SDK, not
even the API. That is the whole cost of the hooks on the hot path of a gateway that does not
trace, and why a gateway without the extra needs nothing to configure.

Tracing is on when the SDK can be imported and the standard variables ask for it
(`OTEL_EXPORTER_OTLP_*ENDPOINT`, `OTEL_TRACES_EXPORTER`, `OTEL_METRICS_EXPORTER`; never with
`OTEL_SDK_DISABLED=true`), or when a test hands its own providers in.

The spans follow the GenAI semantic conventions: one SERVER span per proxied request
(`request_start` … `request_end`), continuing the client's W3C `traceparent`, and one CLIENT
child per upstream attempt (`attempt_start` … `attempt_end`), whose context goes upstream in
the attempt's own `traceparent` (`inject`). Attributes carry names, models, counts and
outcomes, never a prompt, a completion, a key or a token: callers pass only those.
docs/observability.md lists them.

The tracer and meter are this module's own, not the global providers: OpenTelemetry lets a
global provider be set once per process, and a gateway embedded in a test (or a second
configure) must be able to set it again.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit

logger = logging.getLogger("llmrotate.telemetry")

Attributes = dict[str, Any]
ObservableCallback = Callable[[], Iterable[tuple[float, Mapping[str, Any]]]]

# Bound by `configure` while tracing is on; None is the off switch every hook checks.
_tracer: Any = None
_meter: Any = None
_api: Any = None  # a namespace of the OpenTelemetry API pieces the hooks use
_owned: list[Any] = []  # providers configure built (and shutdown closes)
_given: list[Any] = []  # providers a caller passed in (flushed at shutdown, not closed)
_gauges: list[tuple[str, str, ObservableCallback]] = []  # register_observable_gauge, in order
_bound_gauges = 0  # how many of _gauges exist on the current meter

_NULL = contextlib.nullcontext()
_MAX_MODEL = 128  # characters of an upstream's response model kept (it is hostile input)

# The variables that ask for an exporter (https://opentelemetry.io/docs/specs/otel/configuration/).
_ASKING = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
    "OTEL_TRACES_EXPORTER",
    "OTEL_METRICS_EXPORTER",
)


# --- Set-up -------------------------------------------------------------------------------


def configure(*, tracer_provider: Any = None, meter_provider: Any = None) -> bool:
    """Turn tracing (and OTel metrics) on if the extra is installed and the environment asks
    for it, or with the providers given (tests). Returns whether it is on."""
    global _tracer, _meter, _builder
    given = tracer_provider is not None or meter_provider is not None
    if _tracer is not None or _meter is not None:
        reset()
    if not given:
        if not _asked_for():
            return False
        try:
            tracer_provider, meter_provider, where = _providers_from_env()
        except ImportError as exc:
            logger.warning(
                "OTEL_* variables are set but the OpenTelemetry SDK is not installed"
                " (pip install 'llmrotate[otel]'); tracing stays off: %s",
                exc,
            )
            return False
        _owned.extend(p for p in (tracer_provider, meter_provider) if p is not None)
        logger.info("OpenTelemetry on: %s", where)
    else:
        _given.extend(p for p in (tracer_provider, meter_provider) if p is not None)
    _load_api()
    if tracer_provider is not None:
        _tracer = tracer_provider.get_tracer("llmrotate")
        _builder = _Builder(_tracer)
    if meter_provider is not None:
        _meter = meter_provider.get_meter("llmrotate")
        _bind_instruments()
    return _tracer is not None or _meter is not None


def shutdown() -> None:
    """Flush what is buffered (the lifespan's shutdown), then back to the no-op state."""
    if _builder is not None:
        _builder.stop()  # the last spans reach the processors before they flush
    for provider in _owned:
        try:
            provider.shutdown()
        except Exception:
            logger.warning("could not flush OpenTelemetry data at shutdown", exc_info=True)
    for provider in _given:
        with contextlib.suppress(Exception):
            provider.force_flush()
    reset()


def reset() -> None:
    """The no-op state (without flushing): hooks do nothing, instruments are unbound.
    Registered observable gauges are kept, to be bound by the next configure."""
    global _tracer, _meter, _bound_gauges, _builder
    if _builder is not None:
        _builder.stop()
    _tracer = _meter = _builder = None
    _bound_gauges = 0
    _owned.clear()
    _given.clear()
    metrics = sys.modules.get("common.metrics")  # not imported here: it reads Django's settings
    for instrument in metrics.instruments() if metrics is not None else ():
        instrument.otel = None


def enabled() -> bool:
    return _tracer is not None


def _asked_for() -> bool:
    env = os.environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return any(env.get(name, "").strip() for name in _ASKING)


def _exporters(variable: str) -> list[str]:
    names = [n.strip().lower() for n in os.environ.get(variable, "otlp").split(",")]
    return [n for n in names if n and n != "none"]


def _chosen(
    signal: str, *, console: Callable[[], Any], otlp: Callable[[], Any]
) -> list[tuple[str, Any]]:
    """(name, exporter) of each exporter OTEL_<signal>_EXPORTER lists that we ship."""
    chosen = []
    for name in _exporters(f"OTEL_{signal}_EXPORTER"):
        if name in ("console", "otlp"):
            chosen.append((name, console() if name == "console" else otlp()))
        else:
            logger.warning("OTEL_%s_EXPORTER=%s is not supported; ignored", signal, name)
    return chosen


def _providers_from_env() -> tuple[Any, Any, str]:
    """A TracerProvider and a MeterProvider built from the OTEL_* variables (either may be None
    when its exporter is "none"), and where their data goes, for the log."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import (
        ConsoleMetricExporter,
        PeriodicExportingMetricReader,
    )
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES are read by Resource.create; only a
    # service name neither of them gives falls back to ours.
    resource = Resource.create({})
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": "llmrotate"}))
    where = []

    def otlp_spans() -> Any:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()

    def otlp_metrics() -> Any:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        return OTLPMetricExporter()

    tracer_provider = None
    span_exporters = _chosen("TRACES", console=ConsoleSpanExporter, otlp=otlp_spans)
    if span_exporters:
        tracer_provider = TracerProvider(resource=resource)
        for name, span_exporter in span_exporters:
            tracer_provider.add_span_processor(BatchSpanProcessor(span_exporter))
            where.append(f"traces to {_destination(name, 'TRACES', 'v1/traces')}")

    meter_provider = None
    readers = []
    for name, metric_exporter in _chosen(
        "METRICS", console=ConsoleMetricExporter, otlp=otlp_metrics
    ):
        readers.append(PeriodicExportingMetricReader(metric_exporter))
        where.append(f"metrics to {_destination(name, 'METRICS', 'v1/metrics')}")
    if readers:
        meter_provider = MeterProvider(resource=resource, metric_readers=readers)
    service = resource.attributes.get("service.name")
    return tracer_provider, meter_provider, f"service {service}, " + ", ".join(where or ["off"])


def _destination(exporter: str, signal: str, path: str) -> str:
    """Where an exporter sends, for the log line: an endpoint without credentials."""
    if exporter == "console":
        return "the console"
    env = os.environ
    url = env.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT", "").strip()
    if not url:
        base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip() or "http://localhost:4318"
        url = base.rstrip("/") + "/" + path
    return url_masked(url)


def url_masked(url: str) -> str:
    """scheme://host[:port]/path of a URL: no user info, query or fragment (they may carry
    credentials)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "(invalid URL)"
    return f"{parts.scheme}://{host}{port}{parts.path}"


class _Api:
    """The OpenTelemetry API, imported once tracing is on."""

    def __init__(self) -> None:
        from opentelemetry import trace
        from opentelemetry.metrics import Observation
        from opentelemetry.sdk.trace import Event, ReadableSpan
        from opentelemetry.trace import SpanKind, Status, StatusCode
        from opentelemetry.trace.propagation.tracecontext import (
            TraceContextTextMapPropagator,
        )

        self.trace = trace
        self.Observation = Observation
        self.SERVER = SpanKind.SERVER
        self.CLIENT = SpanKind.CLIENT
        self.ERROR = Status(StatusCode.ERROR)
        self.UNSET = Status(StatusCode.UNSET)
        self.SpanContext = trace.SpanContext
        self.TraceFlags = trace.TraceFlags
        self.NonRecordingSpan = trace.NonRecordingSpan
        self.ReadableSpan = ReadableSpan
        self.Event = Event
        # Only W3C trace context (traceparent, tracestate): a client's baggage is not sent to
        # the upstream provider, whatever OTEL_PROPAGATORS says.
        self.propagator = TraceContextTextMapPropagator()


def _load_api() -> None:
    global _api
    if _api is None:
        _api = _Api()


def _bind_instruments() -> None:
    """An OTel twin for each Prometheus instrument of common.metrics: counters and gauges are
    observed from this process's Prometheus values at each export (an SDK update costs three
    to four times a Prometheus one, on the recorder's thread, for every record); histograms,
    which OTel cannot observe, get each observation forwarded. Then the observable gauges
    registered so far."""
    from common import metrics

    meter = _meter
    for instrument in metrics.instruments():
        if instrument.kind == "histogram":
            instrument.otel = meter.create_histogram(
                instrument.name,
                unit="s",
                description=instrument.doc,
                explicit_bucket_boundaries_advisory=list(getattr(instrument, "buckets", ())),
            )
            continue
        create = (
            meter.create_observable_counter
            if instrument.kind == "counter"
            else meter.create_observable_gauge
        )
        create(
            instrument.name,
            callbacks=[_observer(instrument.readings)],
            unit=instrument.unit,
            description=instrument.doc,
        )
    _bind_gauges()


def _bind_gauges() -> None:
    global _bound_gauges
    while _bound_gauges < len(_gauges):
        name, doc, callback = _gauges[_bound_gauges]
        _meter.create_observable_gauge(name, callbacks=[_observer(callback)], description=doc)
        _bound_gauges += 1


def _observer(callback: ObservableCallback) -> Callable[[Any], Iterable[Any]]:
    def observe(options: Any) -> Iterable[Any]:
        observation = _api.Observation
        try:
            return [observation(value, dict(attrs)) for value, attrs in callback()]
        except Exception:
            logger.warning("an OpenTelemetry gauge could not be read", exc_info=True)
            return []

    return observe


def register_observable_gauge(name: str, doc: str, callback: ObservableCallback) -> None:
    """A gauge read when the metric reader collects: `callback()` returns (value, attributes)
    pairs. Registered before configure, it is created by configure."""
    _gauges.append((name, doc, callback))
    if _meter is not None:
        _bind_gauges()


# --- Spans --------------------------------------------------------------------------------
#
# The request path only drafts its spans: ids, times, attributes and events in a plain object
# (`Draft`), a `traceparent` string, a context variable. The SDK's spans are built from the
# drafts on a thread of their own (`_Builder`) and handed to the provider's span processors as
# if they had just ended. The SDK's span creation (attribute checks, locks, its processors) was
# most of what tracing cost the request path (docs/benchmarks.md); a draft costs a few
# microseconds. The sampler still decides, with the SDK's own rules, when the request starts.


class Draft:
    """One span as the request path knows it; `_build` turns it into the SDK's ReadableSpan."""

    __slots__ = (
        "attributes",
        "end_ns",
        "error",
        "events",
        "flags",
        "kind",
        "name",
        "parent",
        "span_id",
        "start_ns",
        "trace_id",
        "trace_state",
    )

    def __init__(
        self,
        name: str,
        kind: Any,
        trace_id: int,
        span_id: int,
        flags: int,
        trace_state: Any,
        parent: Any,
        start_ns: int,
        attributes: Attributes,
    ) -> None:
        self.name, self.kind = name, kind
        self.trace_id, self.span_id, self.flags = trace_id, span_id, flags
        self.trace_state, self.parent = trace_state, parent
        self.start_ns, self.end_ns = start_ns, 0
        self.attributes = attributes
        self.events: list[tuple[str, Attributes, int]] = []
        self.error: str | None = None

    @property
    def sampled(self) -> bool:
        return bool(self.flags & 0x01)

    def context(self) -> Any:
        return _api.SpanContext(
            self.trace_id,
            self.span_id,
            is_remote=False,
            trace_flags=_api.TraceFlags(self.flags),
            trace_state=self.trace_state,
        )

    def end(self, attributes: Attributes, error: str | None) -> None:
        if self.end_ns:
            return  # ended once only
        self.end_ns = time.time_ns()
        self.attributes.update(attributes)
        if error:
            self.attributes["error.type"] = error
            self.error = error
        if self.sampled and _builder is not None:
            _builder.add(self)


_current: contextvars.ContextVar[Draft | None] = contextvars.ContextVar(
    "llmrotate_span", default=None
)


class _Builder:
    """Builds the SDK's spans from ended drafts, off the request path, and ends them into the
    tracer's span processors (the batch processor and its exporter, or a test's)."""

    def __init__(self, tracer: Any) -> None:
        self.tracer = tracer
        self._drafts: deque[Draft] = deque()
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="llmrotate-spans", daemon=True)
        self._thread.start()

    def add(self, draft: Draft) -> None:
        self._drafts.append(draft)  # deque.append is atomic: no lock on the request path
        if len(self._drafts) >= 64:
            self._wake.set()

    def flush(self) -> None:
        """Build every draft ended so far, on the calling thread."""
        processor, resource = self.tracer.span_processor, self.tracer.resource
        scope = self.tracer._instrumentation_scope
        while True:
            try:
                draft = self._drafts.popleft()
            except IndexError:
                return
            try:
                processor.on_end(_build(draft, resource, scope))
            except Exception:
                logger.warning("a span could not be built", exc_info=True)

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=5)
        self.flush()

    def _run(self) -> None:
        while not self._stop:
            self._wake.wait(0.1)
            self._wake.clear()
            self.flush()


_builder: _Builder | None = None


def _build(draft: Draft, resource: Any, scope: Any) -> Any:
    api = _api
    return api.ReadableSpan(
        draft.name,
        context=draft.context(),
        parent=draft.parent,
        resource=resource,
        attributes=draft.attributes,
        events=tuple(api.Event(name, attrs, at) for name, attrs, at in draft.events),
        kind=draft.kind,
        status=api.ERROR if draft.error else api.UNSET,
        start_time=draft.start_ns,
        end_time=draft.end_ns,
        instrumentation_scope=scope,
    )


def flush_spans() -> None:
    """Hand every span ended so far to the span processors now (tests, shutdown)."""
    if _builder is not None:
        _builder.flush()


def _start(name: str, kind: Any, parent: Any, start_ns: int, attributes: Attributes) -> Draft:
    """A draft, sampled (or not) by the tracer's sampler as the SDK would decide; `parent` is
    the SpanContext of the client's span, of the request's, or None."""
    tracer = _tracer
    if parent is not None and parent.is_valid:
        trace_id = parent.trace_id
        parent_context = _api.trace.set_span_in_context(_api.NonRecordingSpan(parent))
    else:
        parent, parent_context = None, None
        trace_id = tracer.id_generator.generate_trace_id()
    result = tracer.sampler.should_sample(parent_context, trace_id, name, kind, attributes)
    if result.attributes:
        attributes.update(result.attributes)
    return Draft(
        name,
        kind,
        trace_id,
        tracer.id_generator.generate_span_id(),
        0x01 if result.decision.is_sampled() else 0x00,
        result.trace_state,
        parent,
        start_ns,
        attributes,
    )


def request_start(
    operation: str, model: str, headers: Mapping[str, str], *, start_ns: int, attributes: Attributes
) -> Draft | None:
    """The SERVER span of a proxied request (None when tracing is off), a child of the
    client's `traceparent` when it sent one. `attributes` are added to the GenAI ones."""
    if _tracer is None:
        return None
    api = _api
    client = api.trace.get_current_span(api.propagator.extract(headers)).get_span_context()
    attributes["gen_ai.operation.name"] = operation
    attributes["gen_ai.request.model"] = model
    return _start(f"{operation} {model}", api.SERVER, client, start_ns, attributes)


def request_end(span: Draft | None, attributes: Attributes, *, error: str | None = None) -> None:
    if span is not None:
        span.end(attributes, error)


def attempt_start(
    parent: Draft | None, operation: str, model: str, attributes: Attributes
) -> Draft | None:
    """The CLIENT span of one upstream attempt, a child of the request's span (None when the
    request has none)."""
    if parent is None or _tracer is None:
        return None
    attributes["gen_ai.operation.name"] = operation
    attributes["gen_ai.request.model"] = model
    return _start(f"{operation} {model}", _api.CLIENT, parent.context(), time.time_ns(), attributes)


def attempt_end(span: Draft | None, attributes: Attributes, *, error: str | None = None) -> None:
    request_end(span, attributes, error=error)


def inject(span: Draft | None, headers: MutableMapping[str, str]) -> None:
    """Add the span's `traceparent` (and `tracestate`) to an upstream request's headers."""
    if span is None:
        return
    headers["traceparent"] = f"00-{span.trace_id:032x}-{span.span_id:016x}-{span.flags:02x}"
    if span.trace_state:
        headers["tracestate"] = span.trace_state.to_header()


def use(span: Draft | None) -> contextlib.AbstractContextManager[Any]:
    """A context in which `span` is the current span (for the log lines and the span events
    written inside it); nothing when there is no span."""
    if span is None:
        return _NULL
    return _use(span)


@contextlib.contextmanager
def _use(span: Draft) -> Iterator[None]:
    token = _current.set(span)
    try:
        yield
    finally:
        _current.reset(token)


def span_ids(span: Draft | None) -> tuple[str, str] | None:
    """(trace id, span id) of a span, in the hex of `traceparent`."""
    if span is None:
        return None
    return f"{span.trace_id:032x}", f"{span.span_id:016x}"


def current_trace_ids() -> tuple[str, str] | None:
    """(trace id, span id) of the current span, for log lines; None when tracing is off or no
    span is current."""
    span = _current.get()
    return span_ids(span) if span is not None and _tracer is not None else None


def _event(name: str, attributes: Attributes) -> None:
    span = _current.get()
    if _tracer is not None and span is not None and span.sampled and not span.end_ns:
        span.events.append((name, attributes, time.time_ns()))


def key_state_changed(key_id: str, before: str, after: str, reason: str) -> None:
    """An event on the current span (the attempt that settled the key) when a key's health
    changes."""
    _event(
        "llmrotate.key_state_change",
        {
            "llmrotate.key_id": key_id,
            "llmrotate.key_state.from": before,
            "llmrotate.key_state.to": after,
            "llmrotate.key_state.reason": reason,
        },
    )


def breaker_changed(endpoint: str, before: str, after: str) -> None:
    """An event on the current span when an endpoint's circuit breaker changes state."""
    _event(
        "llmrotate.breaker_change",
        {
            "llmrotate.endpoint": url_masked(endpoint),
            "llmrotate.breaker.from": before,
            "llmrotate.breaker.to": after,
        },
    )


@lru_cache(maxsize=256)
def server_address(base_url: str) -> tuple[str, int]:
    """`server.address` and `server.port` of an upstream (never its user info)."""
    try:
        parts = urlsplit(base_url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return "", 0
    return parts.hostname or "", port


def response_model(value: Any) -> str | None:
    """The model an upstream says answered, bounded (the upstream is not trusted)."""
    return value[:_MAX_MODEL] if isinstance(value, str) and value else None
