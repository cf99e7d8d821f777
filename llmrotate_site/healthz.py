"""`GET /healthz`: the gateway's own liveness, for load balancers and orchestrators.

The database (`SELECT 1`), the task broker, and Redis when configured, checked in parallel with
a one-second limit each: `200 {"status": "ok", …}`, or `503` naming what failed. Then whether
the probes still run (the Celery worker and beat): when they stopped, routing goes on from the
last known health, so that is `200 {"status": "degraded", …}` naming `probes`, not a 503 that
would take a working gateway out of its load balancer. No authentication, and no secrets:
errors are named by their exception class. A site-level view: it looks at what the whole site
is made of (the broker is the site's Celery app).
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Callable

from django.conf import settings
from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_GET

CHECK_TIMEOUT_SECONDS = 1.0


def _check_database() -> None:
    from django.db import connections

    try:
        with connections["default"].cursor() as cursor:
            cursor.execute("SELECT 1")
    finally:
        # This thread is thrown away; its connection must not linger.
        connections.close_all()


def _check_broker() -> None:
    from llmrotate_site.celery import app

    folder = settings.CELERY_BROKER_TRANSPORT_OPTIONS.get("data_folder_out")
    if isinstance(folder, str) and not os.access(folder, os.W_OK):
        raise PermissionError("the broker folder is not writable")
    with app.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1, timeout=CHECK_TIMEOUT_SECONDS)


def _check_redis() -> None:
    import redis

    client = redis.Redis.from_url(
        settings.REDIS_URL,
        socket_connect_timeout=CHECK_TIMEOUT_SECONDS,
        socket_timeout=CHECK_TIMEOUT_SECONDS,
    )
    try:
        client.ping()
    finally:
        client.close()


def _check_probes() -> str:
    from django.db import connections

    from healthchecks.selectors import probes_freshness

    try:
        freshness = probes_freshness()
    finally:
        connections.close_all()
    if freshness.state == "stale":
        return f"stale: no probe result for {freshness.last_result_age_seconds:.0f} s"
    return freshness.state


@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    checks: dict[str, Callable[[], None]] = {"database": _check_database, "broker": _check_broker}
    if settings.REDIS_URL:
        checks["redis"] = _check_redis
    # In parallel, each bounded: a hung dependency costs this request one second, not more.
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=len(checks))
    futures = {name: pool.submit(check) for name, check in checks.items()}
    results: dict[str, str] = {}
    for name, future in futures.items():
        try:
            future.result(timeout=CHECK_TIMEOUT_SECONDS)
            results[name] = "ok"
        except concurrent.futures.TimeoutError:
            results[name] = "timed out"
        except Exception as exc:
            results[name] = f"failed: {type(exc).__name__}"
    failing = [name for name, result in results.items() if result != "ok"]
    degraded = []
    if "database" not in failing:
        probes = pool.submit(_check_probes)
        try:
            results["probes"] = probes.result(timeout=CHECK_TIMEOUT_SECONDS)
        except concurrent.futures.TimeoutError:
            results["probes"] = "timed out"
        except Exception as exc:
            results["probes"] = f"failed: {type(exc).__name__}"
        if results["probes"] not in ("ok", "off"):
            degraded.append("probes")
    pool.shutdown(wait=False)
    status = "fail" if failing else "degraded" if degraded else "ok"
    body = {"status": status, "checks": results, "failing": failing, "degraded": degraded}
    return JsonResponse(body, status=503 if failing else 200)
