"""Errors Django raises before any view (an unknown path, a Host outside ALLOWED_HOSTS): JSON in
the caller's envelope on the API's paths, which SDKs read; Django's pages on the dashboard's.
Through the real ASGI application, so the proxy's `/v1/` fast path answers its paths."""

from __future__ import annotations

import json
import logging

import pytest

from tests.proxy import conftest as proxy_fixtures
from tests.proxy.conftest import Gateway, asgi_request

gateway = proxy_fixtures.gateway

pytestmark = pytest.mark.django_db(transaction=True)

ANTHROPIC = ((b"anthropic-version", b"2023-06-01"),)


def bearer(gateway: Gateway) -> tuple[tuple[bytes, bytes], ...]:
    return ((b"authorization", f"Bearer {gateway.token}".encode()),)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/chat/completion"),
        ("GET", "/v1/nope"),
        ("GET", "/api/nope"),
        ("GET", "/api/health/nope"),
        ("GET", "/v1/usage/nope"),
    ],
)
async def test_an_unknown_api_path_is_a_json_404_worded_as_openai_words_it(
    gateway: Gateway, method: str, path: str
):
    answer = await asgi_request(path, method=method, body=b"{}", headers=bearer(gateway))
    assert answer.status == 404, answer.body
    assert answer.headers[b"content-type"] == b"application/json"
    assert json.loads(answer.body) == {
        "error": {
            "message": f"Invalid URL ({method} {path})",
            "type": "invalid_request_error",
            "code": "not_found",
            "param": None,
        }
    }


async def test_an_anthropic_caller_gets_its_404_in_anthropic_s_envelope(gateway: Gateway):
    answer = await asgi_request("/v1/message", body=b"{}", headers=(*bearer(gateway), *ANTHROPIC))
    assert answer.status == 404, answer.body
    body = json.loads(answer.body)
    assert body["type"] == "error" and body["error"]["type"] == "not_found_error"


@pytest.mark.parametrize("segments", [0, 91], ids=["whole", "across the cut"])
async def test_a_secret_in_an_unknown_path_is_not_echoed(gateway: Gateway, segments: int):
    secret = "sk-proj-" + "Qa7" * 8 + "wXyZ0123456789abcdef"
    # With 91 segments before it, a cut at 200 characters would leave "sk-proj-Qa7Qa7": too
    # short to be recognised as a secret, and six of its characters shown.
    path = "/v1/" + "x/" * segments + secret
    answer = await asgi_request(path, method="GET", headers=bearer(gateway))
    assert answer.status == 404, answer.body
    message = json.loads(answer.body)["error"]["message"]
    assert "Qa7Qa7" not in message and "wXyZ" not in message, message


async def test_an_unknown_dashboard_path_is_still_django_s_page():
    answer = await asgi_request("/dashboard/nope", method="GET")
    assert answer.status == 404
    assert answer.headers[b"content-type"].startswith(b"text/html")


@pytest.mark.parametrize(
    ("path", "anthropic"),
    [("/v1/chat/completions", False), ("/v1/messages", True), ("/api/usage", False)],
)
async def test_a_host_outside_allowed_hosts_is_a_json_400_and_one_warning_line(
    gateway: Gateway, caplog: pytest.LogCaptureFixture, path: str, anthropic: bool
):
    with caplog.at_level(logging.INFO):
        answer = await asgi_request(
            path,
            method="POST" if path.startswith("/v1/") else "GET",
            body=b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}',
            headers=bearer(gateway),
            host=b"evil.example",
        )
    assert answer.status == 400, answer.body
    body = json.loads(answer.body)
    error = body["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_host")
    assert ("type" in body) is anthropic
    assert b"ALLOWED_HOSTS" not in answer.body and b"evil.example" not in answer.body
    [record] = [r for r in caplog.records if r.name == "django.security.DisallowedHost"]
    assert record.levelno == logging.WARNING
    assert record.exc_info is None and record.exc_text is None
    assert "evil.example" in record.getMessage()


async def test_a_host_outside_allowed_hosts_on_the_dashboard_is_django_s_page():
    answer = await asgi_request("/dashboard/", method="GET", host=b"evil.example")
    assert answer.status == 400
    assert answer.headers[b"content-type"].startswith(b"text/html")
