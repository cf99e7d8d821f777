"""LLMROTATE_CORS_ORIGINS: browser pages on the listed origins may read the monitoring API
(`/api/`, `/v1/usage/`), preflight included; nothing else ever answers with CORS headers.

Every request goes through the real ASGI application, as uvicorn calls it, so the proxy's
`/v1/` fast path (which skips the middleware) is what answers the proxy paths."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pytest_django.fixtures import Settings

from tests.factories import ClientTokenFactory
from tests.proxy import conftest as proxy_fixtures
from tests.proxy.conftest import AsgiResult, Gateway, asgi_request

gateway = proxy_fixtures.gateway

pytestmark = pytest.mark.django_db(transaction=True)

ALLOWED = "https://grafana.example.com"
OTHER = "https://evil.example.net"
MONITORING_PATHS = ["/api/usage", "/api/usage/recent", "/api/health", "/v1/usage/stats"]


@pytest.fixture
def allowed(settings: Settings) -> None:
    settings.CORS_ALLOWED_ORIGINS = [ALLOWED]


@pytest.fixture
def monitor_token(transactional_db: None) -> str:
    return str(ClientTokenFactory(scopes=["monitor"]).raw_token)


def cors_headers(result: AsgiResult) -> dict[bytes, bytes]:
    return {k: v for k, v in result.headers.items() if k.startswith(b"access-control-")}


async def get(path: str, *, origin: str, token: str) -> AsgiResult:
    return await asgi_request(
        path,
        method="GET",
        headers=((b"origin", origin.encode()), (b"authorization", f"Bearer {token}".encode())),
    )


async def preflight(path: str, *, origin: str, method: str = "GET") -> AsgiResult:
    # What a browser sends before a GET carrying Authorization: no credentials of its own.
    return await asgi_request(
        path,
        method="OPTIONS",
        headers=(
            (b"origin", origin.encode()),
            (b"access-control-request-method", method.encode()),
            (b"access-control-request-headers", b"authorization"),
        ),
    )


@pytest.mark.parametrize("path", MONITORING_PATHS)
async def test_an_allowed_origin_may_read_the_monitoring_api(
    allowed: None, monitor_token: str, path: str
):
    result = await get(path, origin=ALLOWED, token=monitor_token)
    assert result.status == 200, result.body[:300]
    assert result.headers[b"access-control-allow-origin"] == ALLOWED.encode()
    # A token, not the admin's session cookie: a page may never read with the admin's rights.
    assert b"access-control-allow-credentials" not in result.headers


async def test_the_monitoring_api_answers_with_data_to_an_allowed_origin(
    allowed: None, monitor_token: str
):
    result = await get("/api/usage", origin=ALLOWED, token=monitor_token)
    assert result.status == 200
    assert isinstance(json.loads(result.body), dict)


@pytest.mark.parametrize("path", MONITORING_PATHS)
async def test_a_preflight_from_an_allowed_origin_may_send_authorization(allowed: None, path: str):
    result = await preflight(path, origin=ALLOWED)
    assert result.status == 200, result.body[:300]
    assert result.headers[b"access-control-allow-origin"] == ALLOWED.encode()
    allowed_headers = result.headers[b"access-control-allow-headers"].decode().split(", ")
    assert "authorization" in allowed_headers
    methods = result.headers[b"access-control-allow-methods"].decode().split(", ")
    assert "GET" in methods
    # Read-only: a page is never invited to change anything.
    assert not {"POST", "PUT", "PATCH", "DELETE"} & set(methods)


@pytest.mark.parametrize("path", MONITORING_PATHS)
async def test_another_origin_gets_no_cors_headers(allowed: None, monitor_token: str, path: str):
    assert cors_headers(await get(path, origin=OTHER, token=monitor_token)) == {}
    assert cors_headers(await preflight(path, origin=OTHER)) == {}


@pytest.mark.parametrize("path", MONITORING_PATHS)
async def test_no_origin_is_allowed_by_default(monitor_token: str, path: str):
    from django.conf import settings

    assert settings.CORS_ALLOWED_ORIGINS == []
    assert cors_headers(await get(path, origin=ALLOWED, token=monitor_token)) == {}
    assert cors_headers(await preflight(path, origin=ALLOWED)) == {}


@pytest.mark.parametrize(
    ("path", "method", "body"),
    [
        (
            "/v1/chat/completions",
            "POST",
            {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
        ),
        ("/v1/models", "GET", None),
        (
            "/v1/messages",
            "POST",
            {
                "model": "gpt-4o-mini",
                "max_tokens": 5,
                "messages": [{"role": "user", "content": "hi"}],
            },
        ),
    ],
)
async def test_the_proxy_never_answers_with_cors_headers(
    allowed: None, gateway: Gateway, path: str, method: str, body: dict[str, object] | None
):
    sent = b"" if body is None else json.dumps(body).encode()
    headers = (
        (b"origin", ALLOWED.encode()),
        (b"authorization", f"Bearer {gateway.token}".encode()),
    )
    result = await asgi_request(path, method=method, body=sent, headers=headers)
    assert result.status is not None and result.status < 500, result.body[:300]
    assert cors_headers(result) == {}
    assert cors_headers(await preflight(path, origin=ALLOWED, method=method)) == {}


@pytest.mark.parametrize("path", ["/admin/", "/admin/login/", "/dashboard/", "/internal/health"])
async def test_the_admin_and_the_dashboard_never_answer_with_cors_headers(
    allowed: None, monitor_token: str, path: str
):
    assert cors_headers(await get(path, origin=ALLOWED, token=monitor_token)) == {}
    assert cors_headers(await preflight(path, origin=ALLOWED)) == {}


def test_llmrotate_cors_origins_sets_the_allowed_origins() -> None:
    env = {**os.environ, "LLMROTATE_CORS_ORIGINS": f"{ALLOWED},https://other.example:8443"}
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import django, json; django.setup(); from django.conf import settings; "
            "print(json.dumps(settings.CORS_ALLOWED_ORIGINS))",
        ],
        env={**env, "DJANGO_SETTINGS_MODULE": "llmrotate_site.settings"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [
        ALLOWED,
        "https://other.example:8443",
    ]


def test_serve_refuses_an_origin_without_a_scheme(tmp_path: Path) -> None:
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")},
        "LLMROTATE_DATA_DIR": str(tmp_path),
        "LLMROTATE_CORS_ORIGINS": "grafana.example.com",
    }
    done = subprocess.run(
        [sys.executable, "manage.py", "serve", "--setup-only"],
        cwd=settings_dir(),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "Origin 'grafana.example.com' in CORS_ALLOWED_ORIGINS is missing scheme" in done.stderr
    assert "llmrotate is set up" not in done.stdout


def settings_dir() -> str:
    from django.conf import settings

    return str(settings.BASE_DIR)
