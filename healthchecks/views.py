"""`GET /internal/health`: the upstream endpoints' health (the gateway's own is `/healthz`,
llmrotate_site.healthz).

No authentication, like the health pages of the tools it replaces: load balancers and uptime
checkers call it without credentials. It shows no secrets: base URLs are masked
(common.redaction.base_url_masked). The same data, behind monitor auth, is
`GET /api/health/endpoints`.
"""

from __future__ import annotations

from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_GET

from healthchecks.selectors import endpoint_health_report


@require_GET
def internal_health(request: HttpRequest) -> JsonResponse:
    return JsonResponse(endpoint_health_report())
