"""Parameters that once reached the database or datetime arithmetic and came back as a 500:
each gets a 422 saying what is accepted, on SQLite and on Postgres alike."""

from __future__ import annotations

import base64

import pytest
from django.test import Client
from django.utils import timezone

from tests.usage import monitoring
from tests.usage.monitoring import call, write_calls

# Fixtures shared by the monitoring API tests.
api = monitoring.api
monitor_token = monitoring.monitor_token

pytestmark = pytest.mark.django_db

ENDPOINTS = [
    "/api/usage", "/api/usage/models", "/api/usage/stats", "/api/usage/clients",
    "/api/usage/timeseries", "/api/usage/recent", "/api/events", "/api/usage/export",
]  # fmt: skip


@pytest.fixture(autouse=True)
def _some_traffic() -> None:
    write_calls([call(started_at=timezone.now())])


def _error(response: object, *, param: str) -> str:
    assert response.status_code == 422, response.content  # type: ignore[attr-defined]
    error = response.json()["error"]  # type: ignore[attr-defined]
    assert error["param"] == param
    return str(error["message"])


@pytest.mark.parametrize("path", ENDPOINTS)
@pytest.mark.parametrize(
    ("param", "value"),
    # Valid ISO 8601 whose conversion to UTC leaves what datetime can hold.
    [("since", "0001-01-01T00:00:00+14:00"), ("until", "9999-12-31T23:59:59-14:00"),
     ("since", "1969-12-31T23:59:59Z"), ("until", "9999-01-01")],
)  # fmt: skip
def test_a_timestamp_out_of_range_says_which_range(
    api: Client, path: str, param: str, value: str
) -> None:
    message = _error(api.get(path, {param: value}), param=param)
    assert "out of range" in message and "1970-01-01 and 9000-01-01" in message


@pytest.mark.parametrize("path", ENDPOINTS)
@pytest.mark.parametrize("param", ["provider", "model", "key", "client"])
def test_a_nul_in_a_filter_is_refused_not_sent_to_the_database(
    api: Client, path: str, param: str
) -> None:
    message = _error(api.get(f"{path}?{param}=openai%00"), param=param)
    assert "control characters" in message


def test_a_nul_in_a_request_id_is_refused(api: Client) -> None:
    assert "control characters" in _error(api.get("/api/requests/req%00"), param="request_id")


@pytest.mark.parametrize("bucket", ["1000000000d", "3000000d", "3651d", "1" * 5000 + "m"])
def test_a_bucket_too_large_says_the_largest(api: Client, bucket: str) -> None:
    message = _error(api.get("/api/usage/timeseries", {"bucket": bucket}), param="bucket")
    assert "up to 3650d" in message


def test_the_largest_bucket_works_at_the_end_of_the_range(api: Client) -> None:
    response = api.get(
        "/api/usage/timeseries", {"since": "8990-01-01", "until": "9000-01-01", "bucket": "3650d"}
    )
    assert response.status_code == 200, response.content
    assert response.json()["bucket_seconds"] == 3650 * 86400


def _cursor(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "cursor",
    [_cursor("2025-01-01T00:00:00+00:00|" + "9" * 30), _cursor("0001-01-01T00:00:00+14:00|5"),
     _cursor("2025-01-01T00:00:00+00:00|-1")],
)  # fmt: skip
def test_a_forged_cursor_is_a_bad_cursor(api: Client, cursor: str) -> None:
    assert "not a cursor" in _error(
        api.get("/api/usage/recent", {"cursor": cursor}), param="cursor"
    )
