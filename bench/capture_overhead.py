"""What does wire capture add to a call? Issue #11's target: with capture on for all traffic,
the added p50 at concurrency 1 grows by less than 0.5 ms, and one worker's throughput drops by
less than 15%, measured in the same run as capture off.

Each run starts one fake upstream and one gateway (`manage.py serve --no-worker --no-beat`,
call recording on, SQLite, the embedded default) with two clients on the same route: `bench`,
not captured, and `bench-captured`, with the capture rule `{client: bench-captured,
sample_rate: 1.0}`: every one of its requests is captured, both legs (client and upstream),
bodies and every stream chunk with its time, and written to the gateway's capture folder by the
writer thread. Comparing two clients of one process rather than two processes leaves out the
noise by which two gateways configured alike differ.

Before measuring, one call per client: the captured client's request id must turn up in a
capture file and the other's must not; otherwise the run would compare two uncaptured clients
and report that capture costs nothing.

Requests go to each target (direct, then each client; then the order turned around) in
rotating blocks, at concurrency 1, 16 and 64, as JSON answers and as streams (the latency of a
stream is that of the whole stream). Per client: added p50/p99 over the direct call of the same
run, requests per second over its own blocks and the gateway web process's CPU ms per request.
Capture's cost: the captured client's added p50 minus the other's (target < 0.5 ms at
concurrency 1), and 1 - rps captured / rps uncaptured at the highest level (target < 15%): at
64 in flight the gateway's one core is saturated, so the blocks' rps is one worker's
throughput. After each run, the capture folder's bytes and bytes per captured request, and how
many of the captured client's calls the files hold (fewer means the writer dropped some, which
would flatter the figures). docs/benchmarks.md has the method and the results.

    .venv/bin/python bench/capture_overhead.py            # 3 runs
    .venv/bin/python bench/capture_overhead.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import sqlite3
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import cbor2
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script from anywhere

from campaign import (
    campaign_arguments,
    campaign_defaults,
    campaign_runs,
    campaign_write,
    verdict,
)
from loadgen import COMPLETED, Target
from proxy_overhead import script_upstream
from report import machine_info
from servers import (
    KINDS,
    ROOT,
    ROUTE_MODEL,
    UPSTREAM_KEYS,
    CpuMeter,
    ServerError,
    Stack,
    descendants,
    measure_kinds,
)

sys.path.insert(0, str(ROOT))  # usage.capture.format: cbor2 only, no Django

from usage.capture.format import NotACapture, capture_files, find_request, read_file

FAST_SCRIPT = {"default": {"latency_ms": 0, "token_delay_ms": 0, "completion_tokens": 16}}
CAPTURED_CLIENT = "bench-captured"
CAPTURE_CONFIG = f"""\
  - {{name: {CAPTURED_CLIENT}, routes: ["*"], scopes: [proxy]}}
capture:
  - {{client: {CAPTURED_CLIENT}, sample_rate: 1.0}}
"""
# Target names: the uncaptured client's and the captured one's, on the same gateway.
OFF, ON = "capture_off", "capture_on"
# The bounds: captured minus uncaptured added p50 at concurrency 1, and the share of
# one worker's throughput lost at the highest level.
TARGET_MS = 0.5
TARGET_LOSS_PERCENT = 15.0
DEFAULT_LEVELS = "1,16,64"
QUICK_LEVELS = "1,8"
CHECK_TIMEOUT_SECONDS = 20.0
# Above this much CPU used by other programs (% of one core) the run is flagged as skewed.
BUSY_MACHINE_PERCENT = 10.0


def configure(stack: Stack, upstream_url: str) -> dict[str, str]:
    """The bench config plus the captured client and its rule; each client's token."""
    return stack.configure_gateway(
        upstream_url, extra=CAPTURE_CONFIG, clients=("bench", CAPTURED_CLIENT)
    )


def capture_dir(stack: Stack) -> Path:
    return stack.data_dir / "captures"


async def check_capture_applies(targets: dict[str, Target], directory: Path) -> None:
    """One call per client, the uncaptured one first; then wait until the captured call's
    request id is in a capture file. The writer appends in the order legs end, so by then the
    uncaptured call, had it been captured, would be in a file too: it must not be."""
    ids = {}
    async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
        for name in (OFF, ON):
            target = targets[name]
            response = await client.post(
                target.url, content=target.body(stream=False), headers=target.headers()
            )
            if response.status_code != 200:
                raise ServerError(f"{name}: status {response.status_code}: {response.text[:300]}")
            request_id = response.headers.get("x-llmrotate-request-id")
            if not request_id:
                raise ServerError(f"{name}: the answer has no x-llmrotate-request-id")
            ids[name] = request_id
    deadline = time.monotonic() + CHECK_TIMEOUT_SECONDS
    while not find_request(ids[ON], directory=directory, when=None):
        if time.monotonic() > deadline:
            raise ServerError(
                f"{CAPTURED_CLIENT}: request {ids[ON]} is in no capture file of {directory}"
                f" after {CHECK_TIMEOUT_SECONDS:g} s (files: {capture_files(directory)})"
            )
        await asyncio.sleep(0.1)
    legs = {e.leg for e in find_request(ids[ON], directory=directory, when=None)}
    if legs != {"client", "upstream"}:
        raise ServerError(f"{CAPTURED_CLIENT}: captured legs {sorted(legs)}, expected both")
    if find_request(ids[OFF], directory=directory, when=None):
        raise ServerError(f"bench (no capture rule): request {ids[OFF]} was captured")


def overhead(out: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Capture's figures from one rotate_targets result: captured minus uncaptured client."""
    figures = {
        f"capture_{q}": out[ON][f"added_{q}"] - out[OFF][f"added_{q}"] for q in ("p50", "p99")
    }
    if out[OFF]["rps"]:
        figures["throughput_loss_percent"] = (1 - out[ON]["rps"] / out[OFF]["rps"]) * 100
    cpu_on, cpu_off = out[ON].get("cpu_ms_per_request"), out[OFF].get("cpu_ms_per_request")
    if cpu_on is not None and cpu_off is not None:
        figures["capture_cpu_ms"] = cpu_on - cpu_off
    return figures


def describe(kind: str, figures: dict[str, Any]) -> str:
    return (
        f"{kind} capture p50 {figures['capture_p50']:+.3f} ms"
        f" (CPU {figures.get('capture_cpu_ms', float('nan')):+.3f} ms/request),"
        f" rps {figures[OFF]['rps']:.0f} -> {figures[ON]['rps']:.0f}"
        f" ({figures.get('throughput_loss_percent', float('nan')):+.1f}%)"
    )


def capture_sizes(directory: Path) -> dict[str, Any]:
    """What the run left in the capture folder: bytes on disk, and per captured request (both
    legs; each exchange re-encoded to split the bytes between JSON answers and streams)."""
    files = capture_files(directory)
    total = sum(p.stat().st_size for p in files)
    per_request: dict[str, int] = defaultdict(int)
    kind_of: dict[str, str] = {}
    clients: dict[str, int] = defaultdict(int)
    problems = []
    for path in files:
        try:
            capture = read_file(path)
        except (NotACapture, OSError) as exc:
            problems.append(str(exc))
            continue
        if capture.problem:
            problems.append(f"{path.name}: {capture.problem}")
        for exchange in capture.exchanges:
            per_request[exchange.request_id] += len(cbor2.dumps(exchange.raw))
            kind_of[exchange.request_id] = "stream" if exchange.stream else "json"
            if exchange.leg == "client":
                clients[str(exchange.get("client"))] += 1
    by_kind: dict[str, dict[str, float]] = {}
    for kind in KINDS:
        sizes = [b for rid, b in per_request.items() if kind_of[rid] == kind]
        if sizes:
            by_kind[kind] = {"requests": len(sizes), "bytes_per_request": sum(sizes) / len(sizes)}
    return {
        "files": len(files),
        "bytes": total,
        "requests": len(per_request),
        "bytes_per_request": total / len(per_request) if per_request else None,
        "by_kind": by_kind,
        "client_legs_by_client": dict(clients),
        "problems": problems,
    }


def records_captured(stack: Stack) -> dict[str, int] | None:
    """Call records flagged `captured`, and all: the recorder's side of the same fact."""
    path = stack.data_dir / "llmrotate.sqlite3"
    if not path.exists():
        return None
    with sqlite3.connect(path) as db:
        total, captured = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(captured), 0) FROM usage_callrecord"
        ).fetchone()
    return {"records": int(total), "captured": int(captured)}


def one_run(index: int, args: argparse.Namespace) -> dict[str, Any]:
    usable = os.sched_getaffinity(0)
    pin = len(usable) >= 2 and not args.no_pin
    gateway_cpu, load_cpu = (1, 0) if pin else (None, None)
    stack = Stack.create(keep_data=False)
    # The gateway's own folder, whatever the environment says, and capture allowed.
    stack.env["LLMROTATE_CAPTURE_DIR"] = str(capture_dir(stack))
    stack.env["LLMROTATE_CAPTURE_ALLOWED"] = "true"
    sent_before = COMPLETED[ON]
    try:
        stack.start_upstream(cpu=load_cpu)
        if not asyncio.run(script_upstream(stack.upstream_url, FAST_SCRIPT)):
            raise ServerError("could not script the fake upstream")
        tokens = configure(stack, stack.upstream_url)
        stack.start_gateway(cpu=gateway_cpu, extra_args=["--no-worker", "--no-beat"])
        assert stack.gateway_pid is not None
        targets = {
            "direct": Target("direct", stack.upstream_url, UPSTREAM_KEYS[0], ROUTE_MODEL),
            OFF: Target(OFF, stack.gateway_url, tokens["bench"], ROUTE_MODEL),
            ON: Target(ON, stack.gateway_url, tokens[CAPTURED_CLIENT], ROUTE_MODEL),
        }
        pids = dict.fromkeys((OFF, ON), stack.gateway_pid)
        if load_cpu is not None:
            os.sched_setaffinity(0, {load_cpu})
        asyncio.run(check_capture_applies(targets, capture_dir(stack)))
        ours = (os.getpid(), *(p for c in stack.children for p in (c.pid, *descendants(c.pid))))
        meter = CpuMeter({"ours": ours}, owns_all=True)
        start, t0 = meter.snapshot(), time.perf_counter()
        print(f"run {index + 1}:", flush=True)
        levels = asyncio.run(
            measure_kinds(
                targets,
                pids,
                args.requests,
                args.levels,
                overhead=overhead,
                describe=describe,
                warmup=args.warmup,
            )
        )
        seconds = time.perf_counter() - t0
        other = meter.other_percent(start, meter.snapshot(), seconds)
        # Stopped first: the gateway drains its capture writer and its recorder on SIGTERM.
        stack.stop_gateway()
        sizes = capture_sizes(capture_dir(stack))
        records = records_captured(stack)
    finally:
        os.sched_setaffinity(0, usable)
        stack.close()
    # The check call and every measured or warm-up call of the captured client.
    sizes["captured_client_calls"] = COMPLETED[ON] - sent_before + 1
    if other is not None and other > BUSY_MACHINE_PERCENT:
        print(f"  warning: other programs used {other:.0f}% of a core during this run")
    legs = sizes["client_legs_by_client"]
    print(
        f"  capture files: {sizes['bytes'] / 1e6:.1f} MB in {sizes['files']} file(s),"
        f" {sizes['bytes_per_request'] or 0:.0f} bytes per request; client legs {legs}"
        f" for {sizes['captured_client_calls']} captured-client calls",
        flush=True,
    )
    if set(legs) - {CAPTURED_CLIENT}:
        raise ServerError(f"requests of other clients were captured: {legs}")
    return {
        "run": index + 1,
        "seconds": round(seconds, 1),
        "other_programs_cpu_percent": None if other is None else round(other, 1),
        "capture_files": sizes,
        "call_records": records,
        "levels": levels,
    }


def table(runs: list[dict[str, Any]]) -> str:
    """Markdown: per level, kind of call and run, each client's added p50/p99, rps and CPU, and
    capture's figures; then the verdicts over the runs."""
    lines = [
        "| concurrency | call | run | direct p50 | added p50 / p99, no capture | added p50 / p99,"
        " captured | **capture: p50** / p99 | rps, no capture / captured | throughput loss |"
        " gateway CPU ms/request, no capture / captured |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    verdicts = []
    last = len(runs[0]["levels"]) - 1
    for li, first in enumerate(runs[0]["levels"]):
        concurrency = first["concurrency"]
        for kind in KINDS:
            p50s, losses = [], []
            for run in runs:
                r = run["levels"][li][kind]
                off, on = r[OFF], r[ON]
                p50s.append(r["capture_p50"])
                loss = r.get("throughput_loss_percent", float("nan"))
                losses.append(loss)
                cpu = " / ".join(
                    f"{x.get('cpu_ms_per_request', float('nan')):.3f}" for x in (off, on)
                )
                lines.append(
                    f"| {concurrency} | {kind} | {run['run']} | {r['direct']['p50']:.3f} |"
                    f" {off['added_p50']:+.3f} / {off['added_p99']:+.3f} |"
                    f" {on['added_p50']:+.3f} / {on['added_p99']:+.3f} |"
                    f" **{r['capture_p50']:+.3f}** / {r['capture_p99']:+.3f} |"
                    f" {off['rps']:.0f} / {on['rps']:.0f} | {loss:+.1f}% | {cpu} |"
                )
            if concurrency == 1:
                verdicts.append(verdict(f"{kind}, concurrency 1: capture adds", p50s, TARGET_MS))
            if li == last:
                verdicts.append(
                    verdict(
                        f"{kind}, concurrency {concurrency}: capture costs",
                        losses,
                        TARGET_LOSS_PERCENT,
                        unit="%",
                        at=" of one worker's throughput",
                    )
                )
    sizes = [
        f"run {run['run']}: {run['capture_files']['bytes'] / 1e6:.1f} MB,"
        f" {run['capture_files']['requests']} requests captured of"
        f" {run['capture_files']['captured_client_calls']} sent; bytes per request "
        + ", ".join(
            f"{kind} {v['bytes_per_request']:.0f}"
            for kind, v in run["capture_files"]["by_kind"].items()
        )
        for run in runs
    ]
    return "\n".join([*lines, "", *verdicts, "", "Capture files:", *sizes])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    campaign_arguments(p, requests_help="requests per target per level and kind")
    args = p.parse_args(argv)
    args.concurrency = args.concurrency or (QUICK_LEVELS if args.quick else DEFAULT_LEVELS)
    runs_wanted = campaign_defaults(args)
    args.warmup = 50 if args.quick else 200
    started = dt.datetime.now(dt.UTC)
    t0 = time.perf_counter()
    runs = campaign_runs(runs_wanted, args, lambda i: one_run(i, args))
    if runs is None:
        return 1
    report = {
        "benchmark": "capture_overhead",
        "schema": 1,
        "started_at": started.isoformat(timespec="seconds"),
        "duration_seconds": round(time.perf_counter() - t0, 1),
        "machine": machine_info(len(os.sched_getaffinity(0))),
        "setup": {
            "database": "sqlite",
            "capture_rule": {"client": CAPTURED_CLIENT, "sample_rate": 1.0},
            "requests_per_target_per_level": args.requests,
            "levels": list(args.levels),
            "pinning": not args.no_pin and len(os.sched_getaffinity(0)) >= 2,
        },
        "target_ms": TARGET_MS,
        "target_throughput_loss_percent": TARGET_LOSS_PERCENT,
        "runs": runs,
    }
    campaign_write("capture_overhead", report, args, table(runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
