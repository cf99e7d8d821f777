"""Fuzz the monitoring endpoints from their OpenAPI schema: whatever the query, no 5xx, and
every answer matches the schema (errors included: 401/403/404/422 are documented).

Schemathesis generates requests for every GET under /api/ and /v1/usage/ and sends them in
process to the WSGI app, authenticated with a `monitor` token: the examples and coverage
phases (boundary values of each declared format, pattern, enum and bound), then random valid
and invalid values, NUL bytes allowed (Postgres refuses NUL in text: a 500 unless the API stops it).
Bounded: MAX_EXAMPLES random cases per operation, a few seconds per operation in all.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from django.core.signals import request_finished, request_started
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections
from django.utils import timezone
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import response_schema_conformance

from tests.factories import ClientTokenFactory
from tests.usage.monitoring import call, write_calls

MAX_EXAMPLES = 30

schema = schemathesis.openapi.from_wsgi("/api/openapi.json", get_wsgi_application()).include(
    method="GET", path_regex=r"^/(api|v1/usage)/"
)
schema.config.generation.update(
    modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], allow_x00=True
)


@pytest.fixture(autouse=True)
def _keep_the_test_connection() -> Iterator[None]:
    # Django's test client does this too: the real WSGI handler closes "old" connections at
    # each request, which would close the test's own transaction under it on Postgres.
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    yield
    request_started.connect(close_old_connections)
    request_finished.connect(close_old_connections)


@pytest.fixture
def token(db: None) -> str:
    write_calls([call(request_id="fuzz-1", started_at=timezone.now())])
    return str(ClientTokenFactory(scopes=["monitor"]).raw_token)


@pytest.mark.django_db
@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_query_makes_a_monitoring_endpoint_fail(case: schemathesis.Case, token: str) -> None:
    case.call_and_validate(
        headers={"Authorization": f"Bearer {token}"},
        checks=[not_a_server_error, response_schema_conformance],
    )
