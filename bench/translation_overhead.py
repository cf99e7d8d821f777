"""What does cross-dialect translation add to a call? Issue #13's target: an OpenAI chat
completion served by an Anthropic deployment (through Anthropic's native Messages API:
proxy/bridges.py, proxy/translate.py) adds less than 0.3 ms at p50 over the native path,
measured in the same run.

Each run starts one fake upstream, which speaks both /v1/chat/completions and /v1/messages, and
one gateway (`manage.py serve --no-worker --no-beat`, call recording on, SQLite) with two
providers on that same fake: `fake` (kind openai) and `fake-anthropic` (kind anthropic), and two
routes, `native` (fake/gpt-4o-mini) and `translated` (fake-anthropic/claude-3-5-haiku-latest),
served to one client. Four targets, each loaded in rotating blocks:

- `direct`: the fake's /v1/chat/completions, called straight;
- `direct_messages`: the fake's /v1/messages, called straight with the equivalent Anthropic body;
- `native`: the gateway, model `native` (chat completions relayed as they are);
- `translated`: the gateway, model `translated` (the request translated to a Messages call, the
  answer or every stream event translated back).

The two upstream endpoints of the fake do not cost the same, so each gateway path is measured
over its own upstream call: translation overhead = (translated p50 - direct_messages p50) -
(native p50 - direct p50), per concurrency level, for JSON answers and for streams (p50 of the
whole stream). Comparing two routes of one process leaves out the ±0.05 ms by which two gateways
configured alike differ. The gateway's CPU ms per request, native and translated, is reported
too: it is much less sensitive to neighbours than wall-clock times.

    .venv/bin/python bench/translation_overhead.py           # 3 runs
    .venv/bin/python bench/translation_overhead.py --quick   # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script from anywhere

from campaign import (
    campaign_arguments,
    campaign_defaults,
    campaign_runs,
    campaign_write,
    verdict,
)
from loadgen import Target
from proxy_overhead import script_upstream
from report import machine_info
from servers import (
    KINDS,
    ROUTE_MODEL,
    UPSTREAM_KEYS,
    CpuMeter,
    ServerError,
    Stack,
    descendants,
    measure_kinds,
)

ANTHROPIC_MODEL = "claude-3-5-haiku-latest"
ANTHROPIC_VERSION = "2023-06-01"
# What the OpenAI client leaves to the server; an Anthropic call must say it.
ANTHROPIC_MAX_TOKENS = 1024
FAST_SCRIPT = {"default": {"latency_ms": 0, "token_delay_ms": 0, "completion_tokens": 16}}
# Formatted by Stack.configure_gateway (upstream, key1, key2, model). Block style, so the only
# braces are its placeholders. One key per provider.
TRANSLATION_CONFIG = f"""\
providers:
  fake:
    kind: openai
    base_url: "{{upstream}}"
  fake-anthropic:
    kind: anthropic
    base_url: "{{upstream}}"
keys:
  - id: fake-1
    provider: fake
    secret: "literal://{{key1}}"
  - id: fake-anthropic-1
    provider: fake-anthropic
    secret: "literal://{{key2}}"
routes:
  native:
    deployments:
      - provider: fake
        model: "{{model}}"
  translated:
    deployments:
      - provider: fake-anthropic
        model: "{ANTHROPIC_MODEL}"
clients:
  - name: bench
    routes: ["*"]
    scopes: [proxy]
"""
# The bound on (translated - direct_messages) - (native - direct), at p50.
TARGET_MS = 0.3
# Above this much CPU used by other programs (% of one core) the run is flagged as skewed.
BUSY_MACHINE_PERCENT = 10.0


@dataclass(frozen=True)
class MessagesTarget(Target):
    """The fake's Anthropic Messages endpoint, called straight with the body that matches the
    chat completion the other targets send (same prompt)."""

    @property
    def url(self) -> str:
        return f"{self.base_url}/messages"

    def body(self, *, stream: bool) -> bytes:
        chat = json.loads(super().body(stream=stream))
        return json.dumps(
            {**chat, "max_tokens": ANTHROPIC_MAX_TOKENS}, separators=(",", ":")
        ).encode()

    def headers(self) -> dict[str, str]:
        return {
            "x-api-key": self.token,
            "anthropic-version": ANTHROPIC_VERSION,
            "content-type": "application/json",
        }


def make_targets(upstream_url: str, gateway_url: str, token: str) -> dict[str, Target]:
    return {
        "direct": Target("direct", upstream_url, UPSTREAM_KEYS[0], ROUTE_MODEL),
        "direct_messages": MessagesTarget(
            "direct_messages", upstream_url, UPSTREAM_KEYS[1], ANTHROPIC_MODEL
        ),
        "native": Target("native", gateway_url, token, "native"),
        "translated": Target("translated", gateway_url, token, "translated"),
        # The same route and upstream call as `translated`, asked in Anthropic's own API: the
        # gateway relays it untranslated.
        "anthropic_native": MessagesTarget("anthropic_native", gateway_url, token, "translated"),
    }


async def check_translation_applies(targets: dict[str, Target], upstream_url: str) -> None:
    """One call on `translated` before measuring: a chat completion comes back, and the fake
    saw a Messages call. Otherwise the run would compare the native path with itself and
    report that translation costs nothing."""
    target = targets["translated"]
    stats_url = upstream_url.removesuffix("/").removesuffix("/v1") + "/_fake/stats"
    async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
        response = await client.post(
            target.url, content=target.body(stream=False), headers=target.headers()
        )
        if response.status_code != 200:
            raise ServerError(f"translated: status {response.status_code}: {response.text[:300]}")
        kind = response.json().get("object")
        if kind != "chat.completion":
            raise ServerError(f"translated: object is {kind!r}, expected 'chat.completion'")
        paths = (await client.get(stats_url)).json().get("paths") or {}
    if not paths.get("/v1/messages"):
        raise ServerError(f"translated: the upstream saw no /v1/messages call, only {paths}")


def overhead(out: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Translation's figures from one rotate_targets result: each gateway path over its own
    upstream call, translated minus native."""
    figures = {
        f"translation_{q}": (out["translated"][q] - out["direct_messages"][q])
        - (out["native"][q] - out["direct"][q])
        for q in ("p50", "p99")
    }
    for q in ("p50", "p99"):
        figures[f"vs_anthropic_native_{q}"] = out["translated"][q] - out["anthropic_native"][q]
    cpu = {
        n: out[n].get("cpu_ms_per_request") for n in ("native", "translated", "anthropic_native")
    }
    if cpu["native"] is not None and cpu["translated"] is not None:
        figures["translation_cpu_ms"] = cpu["translated"] - cpu["native"]
    if cpu["anthropic_native"] is not None and cpu["translated"] is not None:
        figures["vs_anthropic_native_cpu_ms"] = cpu["translated"] - cpu["anthropic_native"]
    return figures


def describe(kind: str, figures: dict[str, Any]) -> str:
    return (
        f"{kind} translation p50 {figures['translation_p50']:+.3f} ms"
        f" (CPU {figures.get('translation_cpu_ms', float('nan')):+.3f} ms/request),"
        f" vs Anthropic native {figures['vs_anthropic_native_p50']:+.3f} ms (CPU"
        f" {figures.get('vs_anthropic_native_cpu_ms', float('nan')):+.3f})"
    )


def one_run(index: int, args: argparse.Namespace) -> dict[str, Any]:
    usable = os.sched_getaffinity(0)
    pin = len(usable) >= 2 and not args.no_pin
    gateway_cpu, load_cpu = (1, 0) if pin else (None, None)
    stack = Stack.create(keep_data=False)
    try:
        stack.start_upstream(cpu=load_cpu)
        if not asyncio.run(script_upstream(stack.upstream_url, FAST_SCRIPT)):
            raise ServerError("could not script the fake upstream")
        stack.configure_gateway(stack.upstream_url, template=TRANSLATION_CONFIG)
        stack.start_gateway(cpu=gateway_cpu, extra_args=["--no-worker", "--no-beat"])
        assert stack.gateway_pid is not None
        targets = make_targets(stack.upstream_url, stack.gateway_url, stack.token)
        pids = dict.fromkeys(("native", "translated", "anthropic_native"), stack.gateway_pid)
        if load_cpu is not None:
            os.sched_setaffinity(0, {load_cpu})
        asyncio.run(check_translation_applies(targets, stack.upstream_url))
        ours = (os.getpid(), *(p for c in stack.children for p in (c.pid, *descendants(c.pid))))
        meter = CpuMeter({"ours": ours}, owns_all=True)
        start, t0 = meter.snapshot(), time.perf_counter()
        print(f"run {index + 1}:", flush=True)
        levels = asyncio.run(
            measure_kinds(
                targets, pids, args.requests, args.levels, overhead=overhead, describe=describe
            )
        )
        seconds = time.perf_counter() - t0
        other = meter.other_percent(start, meter.snapshot(), seconds)
    finally:
        os.sched_setaffinity(0, usable)
        stack.close()
    if other is not None and other > BUSY_MACHINE_PERCENT:
        print(f"  warning: other programs used {other:.0f}% of a core during this run")
    return {
        "run": index + 1,
        "seconds": round(seconds, 1),
        "other_programs_cpu_percent": None if other is None else round(other, 1),
        "levels": levels,
    }


def table(runs: list[dict[str, Any]]) -> str:
    """Markdown: per level, kind of call and run, each path's p50 and the translation figure;
    then, at concurrency 1, the spread of the figure over the runs and whether the target
    holds."""
    lines = [
        "| concurrency | call | run | direct p50 | direct_messages p50 | native added p50"
        " | translated added p50 | translation p50 / p99 | gateway CPU ms/request, native /"
        " translated |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    verdicts = []
    for li, first in enumerate(runs[0]["levels"]):
        concurrency = first["concurrency"]
        for kind in KINDS:
            figures = []
            for run in runs:
                r = run["levels"][li][kind]
                figures.append(r["translation_p50"])
                cpu = " / ".join(
                    f"{r[n].get('cpu_ms_per_request', float('nan')):.3f}"
                    for n in ("native", "translated")
                )
                lines.append(
                    f"| {concurrency} | {kind} | {run['run']} | {r['direct']['p50']:.3f} |"
                    f" {r['direct_messages']['p50']:.3f} | {r['native']['added_p50']:+.3f} |"
                    f" {r['translated']['p50'] - r['direct_messages']['p50']:+.3f} |"
                    f" {r['translation_p50']:+.3f} / {r['translation_p99']:+.3f} | {cpu} |"
                )
            if concurrency == 1:
                verdicts.append(
                    verdict(f"{kind}, concurrency 1: translation adds", figures, TARGET_MS)
                )
    return "\n".join([*lines, "", *verdicts])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    campaign_arguments(p, requests_help="requests per target per level and kind")
    args = p.parse_args(argv)
    runs_wanted = campaign_defaults(args)
    started = dt.datetime.now(dt.UTC)
    t0 = time.perf_counter()
    runs = campaign_runs(runs_wanted, args, lambda i: one_run(i, args))
    if runs is None:
        return 1
    report = {
        "benchmark": "translation_overhead",
        "schema": 1,
        "started_at": started.isoformat(timespec="seconds"),
        "duration_seconds": round(time.perf_counter() - t0, 1),
        "machine": machine_info(len(os.sched_getaffinity(0))),
        "setup": {
            "database": "sqlite",
            "routes": {
                "native": f"fake/{ROUTE_MODEL}",
                "translated": f"fake-anthropic/{ANTHROPIC_MODEL}",
            },
            "requests_per_target_per_level": args.requests,
            "pinning": not args.no_pin and len(os.sched_getaffinity(0)) >= 2,
        },
        "target_ms": TARGET_MS,
        "runs": runs,
    }
    campaign_write("translation_overhead", report, args, table(runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
