"""OpenTelemetry on, with the SDK's in-memory exporters, for one test; and a gateway whose route
name differs from its upstream model, so that request and response models can be told apart."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.proxy.conftest import Gateway, base_config, gateway_serving
from tests.proxy.conftest import anthropic_gateway as anthropic_gateway  # the fixture, re-used

ROUTE = "my-route"
FALLBACK_ROUTE = "my-fallback"


@dataclass
class Otel:
    spans: Any  # InMemorySpanExporter
    metrics: Any  # InMemoryMetricReader

    def finished(self) -> list[Any]:
        from common import telemetry

        telemetry.flush_spans()  # spans are built off the request path
        return list(self.spans.get_finished_spans())

    def points(self, name: str) -> list[Any]:
        """Data points of one metric, over every scope of the last collection."""
        data = self.metrics.get_metrics_data()
        found = []
        for resource in data.resource_metrics if data else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == name:
                        found.extend(metric.data.data_points)
        return found


@pytest.fixture
def otel() -> Iterator[Otel]:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from common import telemetry

    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    assert telemetry.configure(tracer_provider=tracer_provider, meter_provider=meter_provider)
    yield Otel(spans=exporter, metrics=reader)
    telemetry.shutdown()
    assert not telemetry.enabled()
    meter_provider.shutdown()
    tracer_provider.shutdown()


def traced_config() -> dict[str, Any]:
    config = base_config()
    config["routes"][ROUTE] = {"deployments": [{"provider": "openai", "model": "gpt-4o-mini"}]}
    config["routes"][FALLBACK_ROUTE] = {
        "deployments": [
            {"provider": "openai", "model": "gpt-4o-mini"},
            {"provider": "backup", "model": "llama-3"},
        ]
    }
    config["clients"][0]["routes"] += [ROUTE, FALLBACK_ROUTE]
    return config


@pytest.fixture
def traced_gateway(
    transactional_db: None, mock_upstream: Callable[..., None], otel: Otel
) -> Iterator[Gateway]:
    yield from gateway_serving(traced_config(), mock_upstream)
