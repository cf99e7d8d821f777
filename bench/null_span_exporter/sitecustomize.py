"""Loaded by every interpreter of the `traced_memory` gateway of observability_overhead.py (its
PYTHONPATH starts here): spans are built and handed to the batch processor as usual, then
dropped instead of encoded and sent, like the SDK's in-memory exporter without the memory.
That isolates what tracing costs on the request path from what exporting costs."""

from __future__ import annotations

import os
from typing import Any

if os.environ.get("LLMROTATE_BENCH_NULL_SPANS") == "1":
    import common.telemetry as telemetry

    _built = telemetry._providers_from_env

    def _null_spans() -> tuple[Any, Any, str]:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            SpanExporter,
            SpanExportResult,
        )

        class Dropped(SpanExporter):
            def export(self, spans: Any) -> SpanExportResult:
                return SpanExportResult.SUCCESS

        tracer_provider, meter_provider, where = _built()
        if tracer_provider is not None:
            tracer_provider.shutdown()
        tracer_provider = TracerProvider(resource=tracer_provider.resource)
        tracer_provider.add_span_processor(BatchSpanProcessor(Dropped()))
        return tracer_provider, meter_provider, where + " (spans dropped: benchmark)"

    telemetry._providers_from_env = _null_spans
