"""What do the Prometheus series and OpenTelemetry tracing add to a call?

One run starts one fake upstream and several gateways on the same data (`manage.py serve`,
embedded default, recording on), identical but for observability:

- `off`: LLMROTATE_METRICS=false, no OTEL_* variables;
- `metrics`: the default (Prometheus series on);
- `traced`: metrics on, and every trace and the OTel metrics exported over OTLP/HTTP to a
  collector stand-in on 127.0.0.1 (this script; it accepts and counts each export);
- `traced_memory`: metrics on and tracing on, spans built, batched and then dropped instead of
  exported (the SDK's in-memory exporter without the memory): what tracing costs the process;
- `traced_sampled`: `traced` with one trace in ten sampled (`parentbased_traceidratio`);
- with --breakdown, `spans_only` and `otel_metrics_only` tell the two signals' costs apart.

Requests go to each target in rotating blocks (direct, then each gateway; then the order
turned around), at concurrency 1 and then 16, so drift hits every target alike. The figure
asked for is each gateway's added p50 minus that of `off`, each added p50 measured against the
direct call in the same run. docs/benchmarks.md has the method and the results.

    .venv/bin/python bench/observability_overhead.py           # ~2 minutes
    .venv/bin/python bench/observability_overhead.py --quick   # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script from anywhere

from loadgen import Pool, Target, run_count
from report import RESULTS_DIR, machine_info
from servers import ROUTE_MODEL, UPSTREAM_KEYS, ServerError, Stack, rotate_targets

VARIANTS = ("off", "metrics", "traced_memory", "traced", "traced_sampled")
# --breakdown adds these: tracing with one of its two signals off, to tell their costs apart.
BREAKDOWN = ("spans_only", "otel_metrics_only")
FAST_SCRIPT = {"default": {"latency_ms": 0, "token_delay_ms": 0, "completion_tokens": 16}}


class CollectorStandIn:
    """Accepts OTLP/HTTP exports (any POST) with 200 and counts them, on 127.0.0.1."""

    def __init__(self) -> None:
        counts = self.counts = {"exports": 0, "bytes": 0}

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                size = int(self.headers.get("content-length") or 0)
                self.rfile.read(size)
                counts["exports"] += 1
                counts["bytes"] += size
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> CollectorStandIn:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()


def variant_env(stack: Stack, variant: str, collector: str) -> None:
    for name in [n for n in stack.env if n.startswith("OTEL_")]:
        del stack.env[name]
    stack.env["LLMROTATE_METRICS"] = "false" if variant == "off" else "true"
    stack.env.pop("LLMROTATE_BENCH_NULL_SPANS", None)
    if variant in ("traced_memory", "traced", "traced_sampled", *BREAKDOWN):
        stack.env.update(
            OTEL_EXPORTER_OTLP_ENDPOINT=collector,
            OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
            OTEL_TRACES_EXPORTER="none" if variant == "otel_metrics_only" else "otlp",
            OTEL_METRICS_EXPORTER="none" if variant == "spans_only" else "otlp",
            OTEL_SERVICE_NAME="llmrotate-bench",
        )
    if variant == "traced_memory":
        # Spans built and batched, then dropped (bench/null_span_exporter/sitecustomize.py).
        stack.env["LLMROTATE_BENCH_NULL_SPANS"] = "1"
        path = [str(Path(__file__).resolve().parent / "null_span_exporter")]
        stack.env["PYTHONPATH"] = os.pathsep.join([*path, stack.env.get("PYTHONPATH", "")])
    if variant == "traced_sampled":
        # What a busy gateway would run: one trace in ten (a client's sampled flag still wins).
        stack.env.update(
            OTEL_TRACES_SAMPLER="parentbased_traceidratio", OTEL_TRACES_SAMPLER_ARG="0.1"
        )


async def rotate(pools: dict[str, Pool], total: int, pids: dict[str, int]) -> dict[str, Any]:
    """servers.rotate_targets, and each variant's added p50 over `off`'s."""
    out = await rotate_targets(pools, total, pids)
    gateways = [name for name in pools if name != "direct"]
    for name in gateways[1:]:
        out[name]["added_p50_vs_off"] = out[name]["added_p50"] - out["off"]["added_p50"]
    return out


async def measure(targets: dict[str, Target], pids: dict[str, int], requests: int) -> list[Any]:
    levels = []
    for concurrency in (1, 16):
        pools = {name: Pool(t, concurrency, "raw") for name, t in targets.items()}
        for pool in pools.values():
            await pool.open()
        try:
            for pool in pools.values():  # warm: caches, upstream pools, lazy imports
                await run_count(pool, max(200, 4 * concurrency))
            level = await rotate(pools, max(requests, concurrency * 16), pids)
        finally:
            for pool in pools.values():
                await pool.aclose()
        levels.append({"concurrency": concurrency, **level})
        print(
            f"  concurrency {concurrency:>2}: direct p50 {level['direct']['p50']:.3f} ms; added"
            " p50 "
            + ", ".join(f"{n} {level[n]['added_p50']:.3f} ms" for n in pids)
            + "; CPU/request "
            + ", ".join(f"{n} {level[n].get('cpu_ms_per_request', 0):.3f} ms" for n in pids),
            flush=True,
        )
    return levels


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small samples: a smoke run")
    p.add_argument("--requests", type=int, help="requests per target per level (default 3000)")
    p.add_argument("--output", help="JSON path (default: bench/results/…)")
    p.add_argument(
        "--breakdown", action="store_true", help="also traces only and OTel metrics only"
    )
    args = p.parse_args(argv)
    requests = args.requests or (300 if args.quick else 3000)
    usable = os.sched_getaffinity(0)
    pin = len(usable) >= 2
    gateway_cpu, load_cpu = (1, 0) if pin else (None, None)
    variants = VARIANTS + (BREAKDOWN if args.breakdown else ())
    stacks = {name: Stack.create(keep_data=False) for name in variants}
    started = dt.datetime.now(dt.UTC)
    t0 = time.perf_counter()
    try:
        with CollectorStandIn() as collector:
            upstream = stacks["off"]
            upstream.start_upstream(cpu=load_cpu)
            asyncio.run(_script(upstream.upstream_url))
            for name, stack in stacks.items():
                variant_env(stack, name, collector.url)
                stack.configure_gateway(upstream.upstream_url)
                stack.start_gateway(cpu=gateway_cpu, extra_args=["--no-worker", "--no-beat"])
            if load_cpu is not None:
                os.sched_setaffinity(0, {load_cpu})
            targets = {
                "direct": Target("direct", upstream.upstream_url, UPSTREAM_KEYS[0], ROUTE_MODEL),
                **{
                    name: Target(name, stack.gateway_url, stack.token, ROUTE_MODEL)
                    for name, stack in stacks.items()
                },
            }
            pids = {n: s.gateway_pid for n, s in stacks.items() if s.gateway_pid is not None}
            levels = asyncio.run(measure(targets, pids, requests))
            for stack in stacks.values():
                stack.stop_gateway()  # graceful: the traced ones flush their last spans
            exports = dict(collector.counts)
    except ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        for stack in reversed(list(stacks.values())):
            stack.close()
    if not exports["exports"]:
        print("error: the traced gateway exported nothing to the collector", file=sys.stderr)
        return 1
    report = {
        "benchmark": "observability_overhead",
        "schema": 1,
        "started_at": started.isoformat(timespec="seconds"),
        "duration_seconds": round(time.perf_counter() - t0, 1),
        "machine": machine_info(len(usable)),
        "setup": {
            "pinning": {"gateway_cpu": gateway_cpu, "load_cpu": load_cpu},
            "requests_per_target_per_level": requests,
            "otlp_exports_received": exports,
        },
        "levels": levels,
    }
    suffix = "-quick" if args.quick else ""
    stem = f"observability_overhead-{dt.date.today().isoformat()}{suffix}"
    path = Path(args.output) if args.output else RESULTS_DIR / f"{stem}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"OTLP exports received: {exports['exports']} ({exports['bytes']} bytes)")
    print(f"results: {path}")
    return 0


async def _script(upstream_url: str) -> None:
    from proxy_overhead import script_upstream

    if not await script_upstream(upstream_url, FAST_SCRIPT):
        raise ServerError("could not script the fake upstream")


if __name__ == "__main__":
    raise SystemExit(main())
