"""A gateway process for test_otel_imports.py: sets Django up on a fresh SQLite database, runs
the ASGI lifespan's startup (where tracing is configured), proxies one chat completion to a
MockTransport upstream through the real ASGI app, runs the shutdown, and prints what it saw as
one JSON line: the status, the upstream's traceparent, which OpenTelemetry modules were loaded
before the gateway started and after the request, and which imports the blocker refused to the
gateway's own code (common/telemetry.py).

Why a baseline: redis-py (8.1) imports `opentelemetry.sdk.metrics` itself, when it can, as soon
as `redis` is imported (keys.state_store imports it); that configures nothing, and is not the
gateway's doing. What the gateway's startup and requests load is what comes after.

    python -m tests.observability.otel_child blocked|plain

`blocked`: an import hook makes the OpenTelemetry SDK and exporters impossible to import, as
if the `otel` extra were not installed (the API may stay: other packages can bring it).
"""

from __future__ import annotations

import asyncio
import importlib.abc
import json
import os
import sys
from typing import Any

BLOCKED = ("opentelemetry.sdk", "opentelemetry.exporter")
refused: list[str] = []  # imports refused to common/telemetry.py


class _NoSdk(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> None:
        if any(fullname == name or fullname.startswith(name + ".") for name in BLOCKED):
            if _from_telemetry():
                refused.append(fullname)
            raise ImportError(f"{fullname} is blocked (no otel extra)")


def _from_telemetry() -> bool:
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_filename.endswith(os.path.join("common", "telemetry.py")):
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False


def _otel_modules() -> list[str]:
    return sorted(m for m in sys.modules if m.startswith("opentelemetry"))


async def _lifespan(application: Any, events: list[str]) -> tuple[Any, asyncio.Task[None]]:
    inbox: asyncio.Queue[dict[str, str]] = asyncio.Queue()
    sent: list[str] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message["type"])
        events.append(message["type"])

    task = asyncio.create_task(application({"type": "lifespan"}, inbox.get, send))
    await inbox.put({"type": "lifespan.startup"})
    while "lifespan.startup.complete" not in sent:
        assert not task.done(), "the lifespan ended during startup"
        await asyncio.sleep(0.01)
    return inbox, task


async def _main(token: str, upstream_headers: list[dict[str, str]]) -> dict[str, Any]:
    from llmrotate_site.asgi import application
    from tests.proxy.conftest import asgi_request

    events: list[str] = []
    inbox, lifespan = await _lifespan(application, events)
    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
    result = await asgi_request(
        "/v1/chat/completions",
        body=body.encode(),
        headers=((b"authorization", f"Bearer {token}".encode()),),
        host=b"localhost",
    )
    await inbox.put({"type": "lifespan.shutdown"})
    await asyncio.wait_for(lifespan, timeout=30)
    return {
        "status": result.status,
        "lifespan": events,
        "upstream_traceparent": [h.get("traceparent") for h in upstream_headers],
    }


def main() -> None:
    mode = sys.argv[1]
    if mode == "blocked":
        sys.meta_path.insert(0, _NoSdk())
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llmrotate_site.settings")
    import django

    django.setup()
    import httpx
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    from common.upstream import set_transport_factory
    from keys.config_io import config_import
    from tests.proxy.conftest import base_config, ok

    token = config_import(data=base_config()).generated_tokens["app"]
    seen: list[dict[str, str]] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        seen.append(dict(request.headers))
        return ok(request)

    set_transport_factory(lambda: httpx.MockTransport(upstream))
    before = _otel_modules()
    out = asyncio.run(_main(token, seen))
    out["loaded_before"] = before
    out["loaded"] = _otel_modules()
    out["refused"] = sorted(set(refused))
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
