"""`python manage.py demo`: the whole gateway with live traffic and zero credentials.

Starts the fake upstream, points a demo configuration at it, starts the gateway, and sends a
steady trickle of requests (streaming and not) with scripted faults mixed in — 429s, 500s,
slow answers, streams cut midway — so rotation, cooldowns, failover and recording can be
watched in the admin and the logs. Ctrl-C stops everything.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from typing import Any

import httpx
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandParser

from fake_upstream import FakeUpstream
from keys.config_io import config_import
from keys.models import ClientToken
from llmrotate_site.management.commands.serve import admin_ensure

DEMO_KEYS = ("demo-1", "demo-2", "demo-3")
FAULTS: list[dict[str, Any]] = [
    {"fault": "429", "retry_after": 8},
    {"fault": "500"},
    {"fault": "none", "latency_ms": 900},
    {"fault": "cut", "cut_after": 4},
    {"fault": "401"},
]


def demo_config(base_url: str) -> dict[str, Any]:
    return {
        "providers": {
            "demo-openai": {
                "kind": "openai",
                "base_url": base_url,
                "cooldown_seconds": 10,
                "quarantine_seconds": 20,
            },
            "demo-backup": {"kind": "openai_compatible", "base_url": base_url},
        },
        "keys": [
            *(
                {"id": key_id, "provider": "demo-openai", "secret": f"sk-demo-{key_id}-0000000000"}
                for key_id in DEMO_KEYS
            ),
            {"id": "backup-1", "provider": "demo-backup", "secret": "sk-demo-backup-1-000000000"},
        ],
        "routes": {
            "gpt-4o-mini": {
                "strategy": "health_aware",
                "deployments": [
                    {"provider": "demo-openai", "model": "gpt-4o-mini"},
                    {"provider": "demo-backup", "model": "gpt-4o-mini"},
                ],
            },
            "gpt-4o": {
                "strategy": "round_robin",
                "deployments": [{"provider": "demo-openai", "model": "gpt-4o"}],
            },
        },
        "clients": [{"name": "demo", "routes": ["*"], "scopes": ["proxy", "monitor"]}],
    }


class Command(BaseCommand):
    help = "Run the gateway against a fake upstream with live demo traffic (no credentials)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000)
        parser.add_argument("--rate", type=float, default=2.0, help="requests per second")
        parser.add_argument(
            "--fault-rate",
            type=float,
            default=0.15,
            help="share of requests preceded by a scripted fault",
        )
        parser.add_argument(
            "--duration",
            type=float,
            default=0,
            help="stop after this many seconds (0: until Ctrl-C)",
        )
        parser.add_argument(
            "--usage-log",
            action="store_true",
            help="also print the JSON usage line of every attempt",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        import uvicorn

        if not options["usage_log"]:
            # One summary line per request below is easier to follow than one JSON per attempt.
            logging.getLogger("llmrotate.usage").setLevel(logging.WARNING)
        call_command("migrate", interactive=False, verbosity=0)
        username, password = admin_ensure(data_dir=settings.DATA_DIR)
        fake = FakeUpstream(script={"default": {"latency_ms": 120, "token_delay_ms": 25}})
        host, port = fake.start_in_thread()
        fake_url = f"http://{host}:{port}/v1"
        # The demo client's token is regenerated on every run: only its hash is stored.
        ClientToken.objects.filter(name="demo").delete()
        report = config_import(data=demo_config(fake_url))
        token = report.generated_tokens["demo"]
        gateway = f"http://{options['host']}:{options['port']}"
        self.stdout.write(self.style.SUCCESS(f"fake upstream on {fake_url}"))
        self.stdout.write(self.style.SUCCESS(f"gateway on {gateway}/v1 with client token:"))
        self.stdout.write(f"  {token}")
        self.stdout.write(
            f"admin: {gateway}/admin/ as '{username}'" + (f" / {password}" if password else "")
        )

        server = uvicorn.Server(
            uvicorn.Config(
                "llmrotate_site.asgi:application",
                host=options["host"],
                port=options["port"],
                lifespan="on",
                access_log=False,
                log_level="warning",
            )
        )
        stop = threading.Event()
        traffic = threading.Thread(
            target=self._traffic,
            daemon=True,
            args=(gateway, token, fake, options["rate"], options["fault_rate"], stop),
        )
        traffic.start()
        if options["duration"]:
            threading.Timer(
                options["duration"], lambda: setattr(server, "should_exit", True)
            ).start()
        try:
            server.run()
        finally:
            stop.set()
            fake.stop()

    def _traffic(
        self,
        gateway: str,
        token: str,
        fake: FakeUpstream,
        rate: float,
        fault_rate: float,
        stop: threading.Event,
    ) -> None:
        rng = random.Random()  # noqa: S311 - picks demo traffic, nothing secret
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=gateway, headers=headers, timeout=60) as client:
            while not stop.is_set():
                try:
                    client.get("/v1/models").raise_for_status()
                    break
                except httpx.HTTPError:
                    time.sleep(0.2)
            n = 0
            while not stop.wait(1.0 / rate):
                n += 1
                if rng.random() < fault_rate:
                    key = f"sk-demo-{rng.choice(DEMO_KEYS)}-0000000000"
                    fault = rng.choice(FAULTS)
                    fake.script({"keys": {key: {"queue": [fault]}}})
                model = rng.choice(["gpt-4o-mini", "gpt-4o-mini", "gpt-4o"])
                stream = rng.random() < 0.5
                self.stdout.write(self._one(client, n, model, stream))

    def _one(self, client: httpx.Client, n: int, model: str, stream: bool) -> str:
        body = {
            "model": model,
            "stream": stream,
            "messages": [{"role": "user", "content": f"Demo request number {n}"}],
        }
        started = time.perf_counter()
        try:
            with client.stream("POST", "/v1/chat/completions", json=body) as response:
                ttft = None
                failed = ""
                for line in response.iter_lines():
                    if ttft is None and '"content":"' in line and '"content":""' not in line:
                        ttft = (time.perf_counter() - started) * 1000
                    if line.startswith('data: {"error"'):
                        failed = json.loads(line[6:])["error"]["code"]
                elapsed = (time.perf_counter() - started) * 1000
                key = response.headers.get("x-llmrotate-key", "-")
                tries = response.headers.get("x-llmrotate-attempts", "-")
        except httpx.HTTPError as exc:
            return f"#{n:<4} {model:<12} transport error: {type(exc).__name__}"
        kind = "stream" if stream else "json  "
        extra = f" ttft {ttft:.0f} ms" if ttft is not None else ""
        note = f"  ⚠ {failed}" if failed else ""
        return (
            f"#{n:<4} {kind} {model:<12} → {response.status_code} via {key:<9} "
            f"attempts {tries}  {elapsed:6.0f} ms{extra}{note}"
        )
