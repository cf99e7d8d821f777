"""The endpoint health on the ninja API, with the monitoring endpoints' auth."""

from __future__ import annotations

from django.http import HttpRequest
from ninja import Field, Router, Schema

from common.errors import AUTH_ERRORS
from healthchecks.selectors import EndpointHealth, endpoint_health_report
from keys.auth import monitor_auth

router = Router(tags=["Health checks"])


class HealthSummaryOut(Schema):
    total: int
    healthy: int
    unhealthy: int


class EndpointHealthSummaryOut(HealthSummaryOut):
    total_endpoints: int = Field(description="As total (LLM Interactive Proxy's name).")
    healthy_endpoints: int = Field(description="As healthy.")
    unhealthy_endpoints: int = Field(description="As unhealthy.")


class EndpointHealthReportOut(Schema):
    endpoint_health: dict[str, EndpointHealth | EndpointHealthSummaryOut] = Field(
        description="`summary`, and each endpoint under its shown URL."
    )
    summary: HealthSummaryOut


@router.get(
    "/endpoints",
    auth=monitor_auth,
    response={200: EndpointHealthReportOut, **AUTH_ERRORS},
    summary="Upstream endpoints: probe results and circuit breakers (as /internal/health)",
)
def endpoints_health(request: HttpRequest) -> dict[str, object]:
    return endpoint_health_report()
