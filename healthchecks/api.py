"""The endpoint health on the ninja API, with the monitoring endpoints' auth."""

from __future__ import annotations

from django.http import HttpRequest
from ninja import Router, Schema

from common.errors import AUTH_ERRORS
from healthchecks.selectors import EndpointHealth, endpoint_health_report
from keys.auth import monitor_auth

router = Router(tags=["Health checks"])


class HealthSummaryOut(Schema):
    total: int
    healthy: int
    unhealthy: int


class EndpointHealthReportOut(Schema):
    endpoint_health: dict[str, EndpointHealth]
    summary: HealthSummaryOut


@router.get(
    "/endpoints",
    auth=monitor_auth,
    response={200: EndpointHealthReportOut, **AUTH_ERRORS},
    summary="Upstream endpoints: probe results and circuit breakers (as /internal/health)",
)
def endpoints_health(request: HttpRequest) -> dict[str, object]:
    return endpoint_health_report()
