"""How much does the gateway add to a call? Latency, TTFT, throughput and memory, direct vs
proxied.

One run starts a fake upstream and the gateway (`manage.py serve`, embedded default: SQLite,
call recording on; `--scaled`: Postgres and Redis), pins them to CPU cores, and compares the
same request sent straight to the upstream with the same request sent through the gateway, in
alternating blocks of the same run; then it sends 10,000 and 100,000 calls through the gateway
and reads its web worker's memory. docs/benchmarks.md explains the method; bench/README.md
the flags.

    .venv/bin/python bench/proxy_overhead.py            # full run, ~4-7 minutes
    .venv/bin/python bench/proxy_overhead.py --quick    # smoke run, well under 30 s
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script from anywhere

from loadgen import COMPLETED, Pool, Samples, Target, percentile, run_count, run_for
from report import evaluate_targets, machine_info, markdown, output_path, write_json
from servers import (
    ROUTE_MODEL,
    UPSTREAM_KEYS,
    CpuMeter,
    Pids,
    ServerError,
    Stack,
    cpu_seconds,
    machine_busy_seconds,
    rss_bytes,
)

# Above this much CPU used by other programs (% of one core), the run is flagged as skewed:
# on a 2-core machine a busy neighbour takes the cores the benchmark pinned its processes to.
BUSY_MACHINE_PERCENT = 10.0
MIB = 1024 * 1024
# The memory phase sends its calls in batches of at most this many, so the load generator
# does not hold 100,000 latencies it has no use for.
RSS_BATCH = 10_000
DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/llmrotate_bench_proxy"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/13"

# Upstream behaviours. Non-streaming: answer at once, so everything measured is the hop.
# Streaming: a per-token delay, so the first content delta is a distinct moment (the role
# chunk comes first, then one token delay) and TTFT means what it means with a real model.
FAST_SCRIPT = {"default": {"latency_ms": 0, "token_delay_ms": 0, "completion_tokens": 16}}


def stream_script(token_delay_ms: float) -> dict[str, Any]:
    # Few tokens: only the first one is timed, the rest just has to be drained.
    return {"default": {"latency_ms": 0, "token_delay_ms": token_delay_ms, "completion_tokens": 4}}


@dataclass(frozen=True)
class Plan:
    requests: int
    concurrency: list[int]
    warmup: int
    ttft_requests: int
    token_delay_ms: float
    throughput_seconds: float
    throughput_ramp: float
    throughput_concurrency: int  # the headline window; the highest of throughput_levels
    throughput_levels: list[int]  # every max-throughput window, lowest first
    rss_requests: list[int]  # proxied calls after which the memory phase reads the RSS
    workers_compare: list[int]  # web worker counts whose max throughput is compared
    client: str
    calibrate: bool
    quick: bool


# ---- statistics ------------------------------------------------------------------------------


def summarize(samples: Samples, values: list[float] | None = None) -> dict[str, Any]:
    """Percentiles in milliseconds, plus throughput over the samples' wall time."""
    ms = sorted(v * 1000 for v in (samples.latencies if values is None else values))
    return {
        "count": len(ms),
        "errors": samples.error_count,
        "p50": percentile(ms, 0.50),
        "p90": percentile(ms, 0.90),
        "p99": percentile(ms, 0.99),
        "mean": sum(ms) / len(ms) if ms else math.nan,
        "max": ms[-1] if ms else math.nan,
        "rps": len(ms) / samples.elapsed if samples.elapsed else math.nan,
    }


def compare(direct: dict[str, Any], proxied: dict[str, Any]) -> dict[str, Any]:
    """Overhead as a difference (what a user waits longer) and as a ratio (how many times)."""
    added = {q: proxied[q] - direct[q] for q in ("p50", "p90", "p99")}
    ratio = {q: proxied[q] / direct[q] if direct[q] else math.nan for q in ("p50", "p90", "p99")}
    return {"direct": direct, "proxied": proxied, "added_ms": added, "ratio": ratio}


def block_sizes(total: int, concurrency: int) -> list[int]:
    """Split a level's requests into up to 6 blocks per side, each >= 8 x concurrency.

    Several blocks let drift (CPU frequency, SQLite growing, a background flush) hit both
    sides alike; blocks much larger than the concurrency keep the ramp-up and drain at each
    block's edges a small part of it.
    """
    blocks = max(1, min(6, total // (concurrency * 8)))
    base, extra = divmod(total, blocks)
    return [base + (1 if i < extra else 0) for i in range(blocks)]


async def interleaved(
    direct: Pool, proxied: Pool, total: int, *, stream: bool, meter: CpuMeter | None = None
) -> tuple[Samples, Samples, float | None]:
    """Alternate blocks in ABBA order (D P P D D P ...), so a linear drift cancels out.

    Also returns the CPU seconds the gateway's web process used during the proxied blocks.
    """
    results = {"direct": Samples(), "proxied": Samples()}
    gateway_cpu: float | None = 0.0
    for i, size in enumerate(block_sizes(total, direct.size)):
        for pool in (direct, proxied) if i % 2 == 0 else (proxied, direct):
            before = meter.group_seconds("gateway") if meter and pool is proxied else None
            results[pool.target.name].extend(await run_count(pool, size, stream=stream))
            if pool is proxied:
                after = meter.group_seconds("gateway") if meter else None
                if gateway_cpu is not None and before is not None and after is not None:
                    gateway_cpu += after - before
                else:
                    gateway_cpu = None
    return results["direct"], results["proxied"], gateway_cpu


# ---- phases ----------------------------------------------------------------------------------


async def script_upstream(upstream_url: str, spec: dict[str, Any]) -> bool:
    """Set the fake upstream's behaviour; False (and a warning) if it is not the fake."""
    root = upstream_url.removesuffix("/").removesuffix("/v1")
    try:
        async with httpx.AsyncClient(trust_env=False, timeout=5) as client:
            response = await client.post(f"{root}/_fake/script", json=spec)
        response.raise_for_status()
    except httpx.HTTPError as exc:
        print(f"warning: could not script the upstream ({exc}); is it the fake?", file=sys.stderr)
        return False
    return True


async def open_pools(targets: list[Target], size: int, client: str) -> list[Pool]:
    pools = [Pool(target, size, client) for target in targets]
    for pool in pools:
        await pool.open()
    return pools


def fail_on_errors(label: str, *samples: Samples) -> None:
    """Latency of failed calls means nothing: stop and say what failed."""
    for s in samples:
        if s.error_count:
            raise ServerError(f"{label}: {s.error_count} failed request(s), e.g. {s.errors}")


async def phase_warmup(direct: Target, proxied: Target, plan: Plan) -> None:
    """Fill caches, the gateway's upstream pool and lazily imported code paths; discarded."""
    size = min(16, max(plan.concurrency))
    pools = await open_pools([direct, proxied], size, plan.client)
    try:
        for pool in pools:
            s = await run_count(pool, plan.warmup)
            fail_on_errors(f"warm-up ({pool.target.name})", s)
            s = await run_count(pool, max(2, plan.warmup // 20), stream=True)
            fail_on_errors(f"warm-up stream ({pool.target.name})", s)
    finally:
        for pool in pools:
            await pool.aclose()


async def phase_latency(
    direct: Target, proxied: Target, plan: Plan, meter: CpuMeter
) -> list[dict[str, Any]]:
    levels = []
    for c in plan.concurrency:
        d_pool, p_pool = await open_pools([direct, proxied], c, plan.client)
        try:
            # A few calls on the fresh connections, so no sample pays for a first use.
            for pool in (d_pool, p_pool):
                await run_count(pool, min(2 * c, max(plan.warmup, c)))
            d, p, cpu = await interleaved(
                d_pool, p_pool, max(plan.requests, c), stream=False, meter=meter
            )
        finally:
            await d_pool.aclose()
            await p_pool.aclose()
        fail_on_errors(f"concurrency {c}", d, p)
        level = {"concurrency": c, **compare(summarize(d), summarize(p))}
        if cpu is not None and p.count:
            level["gateway_cpu_ms_per_request"] = cpu * 1000 / p.count
        levels.append(level)
        print(
            f"  concurrency {c:>3}: direct p50 {level['direct']['p50']:.2f} ms "
            f"({level['direct']['rps']:.0f} rps), proxied p50 {level['proxied']['p50']:.2f} ms "
            f"({level['proxied']['rps']:.0f} rps)",
            flush=True,
        )
    return levels


async def phase_ttft(
    direct: Target, proxied: Target, plan: Plan, upstream_url: str
) -> dict[str, Any]:
    scripted = await script_upstream(upstream_url, stream_script(plan.token_delay_ms))
    try:
        d_pool, p_pool = await open_pools([direct, proxied], 1, plan.client)
        try:
            for pool in (d_pool, p_pool):
                await run_count(pool, 5, stream=True)
            d, p, _ = await interleaved(d_pool, p_pool, plan.ttft_requests, stream=True)
        finally:
            await d_pool.aclose()
            await p_pool.aclose()
    finally:
        if scripted:
            await script_upstream(upstream_url, FAST_SCRIPT)
    fail_on_errors("streaming", d, p)
    result = compare(summarize(d, d.ttfts), summarize(p, p.ttfts))
    result["token_delay_ms"] = plan.token_delay_ms if scripted else None
    result["total_p50_ms"] = {"direct": summarize(d)["p50"], "proxied": summarize(p)["p50"]}
    print(
        f"  TTFT p50: direct {result['direct']['p50']:.2f} ms, "
        f"proxied {result['proxied']['p50']:.2f} ms",
        flush=True,
    )
    return result


# The gateway counts as idle below this CPU use (% of one core): its Celery helpers and the
# breaker sync tick over at a few per cent.
IDLE_PERCENT = 10.0
IDLE_WAIT_SECONDS = 20.0


async def gateway_settled(meter: CpuMeter) -> tuple[float, float]:
    """Wait until the gateway has done what earlier load left it: the recorder writes records
    after their calls are answered, and one window's writes must not be billed to the next
    (back to back, the second of two windows at the same level lost 4 %). Returns the seconds
    waited and the gateway CPU seconds spent meanwhile."""
    t_start = time.perf_counter()
    first = meter.snapshot()
    prev_t, prev = t_start, first
    while time.perf_counter() - t_start < IDLE_WAIT_SECONDS:
        await asyncio.sleep(0.25)
        now_t, now = time.perf_counter(), meter.snapshot()
        busy = meter.percent(prev, now, now_t - prev_t).get("gateway")
        prev_t, prev = now_t, now
        if busy is None or busy < IDLE_PERCENT:
            break
    used = (prev.get("gateway") or 0.0) - (first.get("gateway") or 0.0)
    return prev_t - t_start, used


async def saturate(target: Target, plan: Plan, client: str, meter: CpuMeter) -> dict[str, Any]:
    """Fixed-duration closed-loop run; CPU use of every involved process over the window.

    A proxied window starts on a settled gateway, and its CPU per request includes what the
    gateway spent after the window finishing the window's records."""
    if target.name == "proxied":
        await gateway_settled(meter)
    pool = (await open_pools([target], plan.throughput_concurrency, client))[0]
    snaps: dict[str, tuple[float, dict[str, float | None]]] = {}

    def on_window(edge: str) -> None:
        snaps[edge] = (time.perf_counter(), meter.snapshot())

    try:
        s = await run_for(
            pool, plan.throughput_seconds, ramp=plan.throughput_ramp, on_window=on_window
        )
    finally:
        await pool.aclose()
    fail_on_errors(f"throughput ({target.name}, {client})", s)
    result = summarize(s)
    (t0, start), (t1, end) = snaps["start"], snaps["end"]
    result["cpu_percent"] = meter.percent(start, end, t1 - t0)
    result["other_cpu_percent"] = meter.other_percent(start, end, t1 - t0)
    gateway = result["cpu_percent"].get("gateway")
    if target.name == "proxied" and gateway is not None and result["count"]:
        settle_seconds, settle_cpu = await gateway_settled(meter)
        result["settle_seconds"] = settle_seconds
        # CPU the gateway spends per request, its records' writing included: the number that
        # caps one worker's throughput.
        cpu = gateway / 100 * (t1 - t0) + settle_cpu
        result["gateway_cpu_ms_per_request"] = cpu * 1000 / result["count"]
    return result


async def phase_throughput(
    direct: Target, proxied: Target, plan: Plan, meter: CpuMeter
) -> dict[str, Any]:
    """A window per side at each level, in ABBA order across levels (D16 P16 P64 D64), so the
    proxied windows whose ratio is a target run back to back."""
    levels = []
    for i, c in enumerate(plan.throughput_levels):
        at = replace(plan, throughput_concurrency=c)
        level: dict[str, Any] = {"concurrency": c}
        for target in (direct, proxied) if i % 2 == 0 else (proxied, direct):
            level[target.name] = await saturate(target, at, plan.client, meter)
        levels.append({"concurrency": c, "direct": level["direct"], "proxied": level["proxied"]})
        print(
            f"  throughput at concurrency {c}: direct {level['direct']['rps']:.0f} rps, "
            f"proxied {level['proxied']['rps']:.0f} rps",
            flush=True,
        )
    top = levels[-1]
    result: dict[str, Any] = {
        "concurrency": top["concurrency"],
        "seconds": plan.throughput_seconds,
        "direct": top["direct"],
        "proxied": top["proxied"],
        "levels": levels,
    }
    if len(levels) > 1:
        low = levels[0]["proxied"]["rps"]
        result["proxied_rps_ratio"] = top["proxied"]["rps"] / low if low else None
    return result


def rss_mib(pids: tuple[int, ...]) -> dict[str, Any]:
    """RSS of each web process and their total, in MiB (None where a process is gone)."""
    each = [rss_bytes(pid) for pid in pids]
    total = None if None in each or not each else sum(b for b in each if b is not None) / MIB
    return {
        "rss_mib": total,
        "rss_mib_by_process": [
            {"pid": pid, "rss_mib": b / MIB if b is not None else None}
            for pid, b in zip(pids, each, strict=True)
        ],
    }


async def phase_rss(proxied: Target, plan: Plan, meter: CpuMeter) -> dict[str, Any]:
    """The web worker's resident memory after each of ``plan.rss_requests`` proxied calls.

    Run last, at the headline concurrency, so the calls are as many and as concurrent as the
    worker can take: a leak per call or per connection shows as growth between the points.
    """
    pids = meter.groups["gateway"]
    c = plan.throughput_concurrency
    pool = (await open_pools([proxied], c, plan.client))[0]
    points = [{"requests": 0, "seconds": 0.0, **rss_mib(pids)}]
    done, t0, start = 0, time.perf_counter(), meter.snapshot()
    try:
        for wanted in plan.rss_requests:
            while done < wanted:
                s = await run_count(pool, min(RSS_BATCH, wanted - done))
                fail_on_errors("memory phase", s)
                done += s.count
            points.append(
                {"requests": done, "seconds": round(time.perf_counter() - t0, 1), **rss_mib(pids)}
            )
            print(
                f"  after {done:,} proxied calls: web worker RSS "
                f"{_mib(points[-1]['rss_mib'])} ({points[-1]['seconds']:.0f} s)",
                flush=True,
            )
    finally:
        await pool.aclose()
    seconds = time.perf_counter() - t0
    first, last = points[1]["rss_mib"], points[-1]["rss_mib"]
    gateway = meter.percent(start, meter.snapshot(), seconds).get("gateway")
    return {
        "concurrency": c,
        "pids": list(pids),
        "points": points,
        "growth_percent": (last - first) / first * 100
        if first and last is not None and len(points) > 2
        else None,
        "rps": done / seconds if seconds else None,
        "gateway_cpu_ms_per_request": gateway / 100 * seconds * 1000 / done
        if gateway is not None and done
        else None,
    }


def _mib(value: float | None) -> str:
    return f"{value:.1f} MiB" if value is not None else "n/a"


# Starts the gateway again with this many web workers; returns the new process groups to
# meter and the new gateway to call.
Restart = Callable[[int], tuple[Pids, Target]]


async def phase_workers(
    proxied: Target, plan: Plan, meter: CpuMeter, restart: Restart
) -> dict[str, Any]:
    """Max throughput with each worker count of ``plan.workers_compare``, the gateway started
    again (same database, same settings) before each; a warm-up, then the usual window."""
    rows = []
    for workers in plan.workers_compare:
        meter.groups, proxied = await asyncio.to_thread(restart, workers)
        pool = (await open_pools([proxied], min(16, plan.throughput_concurrency), plan.client))[0]
        try:
            fail_on_errors("warm-up", await run_count(pool, max(plan.warmup, 64)))
        finally:
            await pool.aclose()
        row = {"workers": workers, **await saturate(proxied, plan, plan.client, meter)}
        rows.append(row)
        print(
            f"  {workers} web worker(s): {row['rps']:.0f} rps at concurrency "
            f"{plan.throughput_concurrency}",
            flush=True,
        )
    first = rows[0]["rps"]
    return {
        "concurrency": plan.throughput_concurrency,
        "seconds": plan.throughput_seconds,
        "by_workers": rows,
        "rps_ratio": rows[-1]["rps"] / first if first else None,
    }


async def phase_calibration(direct: Target, plan: Plan, meter: CpuMeter) -> dict[str, Any]:
    """The same direct calls with both clients: how much of a baseline is the client itself."""
    # Short windows: direct calls are fast, a few thousand samples are plenty.
    short = replace(plan, throughput_seconds=2.0, throughput_ramp=0.5)
    levels = [replace(short, throughput_concurrency=1), short]
    out: dict[str, Any] = {}
    for client in ("raw", "httpx"):
        out[client] = {
            f"concurrency_{lp.throughput_concurrency}": await saturate(direct, lp, client, meter)
            for lp in levels
        }
    return out


async def measure(
    direct: Target,
    proxied: Target,
    plan: Plan,
    upstream_url: str,
    meter: CpuMeter,
    restart: Restart | None,
) -> dict[str, Any]:
    """Every phase; ``restart`` (None for a gateway we did not start) for the worker counts."""
    results: dict[str, Any] = {}
    phase_seconds: dict[str, float] = {}
    start, t_start = meter.snapshot(), time.perf_counter()

    async def phase(name: str, title: str, coro: Coroutine[Any, Any, Any]) -> Any:
        print(title, flush=True)
        t0 = time.perf_counter()
        value = await coro
        phase_seconds[name] = round(time.perf_counter() - t0, 1)
        return value

    await script_upstream(upstream_url, FAST_SCRIPT)
    await phase("warmup", "warming up …", phase_warmup(direct, proxied, plan))
    results["latency"] = await phase(
        "latency",
        "latency, non-streaming (direct and proxied blocks interleaved):",
        phase_latency(direct, proxied, plan, meter),
    )
    results["ttft"] = await phase(
        "ttft", "streaming, concurrency 1:", phase_ttft(direct, proxied, plan, upstream_url)
    )
    results["throughput"] = await phase(
        "throughput",
        "maximum throughput (direct and proxied windows, ABBA across levels):",
        phase_throughput(direct, proxied, plan, meter),
    )
    if plan.calibrate:
        results["calibration"] = await phase(
            "calibration",
            "load generator calibration (direct calls, raw client vs httpx):",
            phase_calibration(direct, plan, meter),
        )
    if plan.rss_requests and "gateway" in meter.groups:
        results["rss"] = await phase(
            "rss",
            f"memory: web worker RSS after {', '.join(f'{n:,}' for n in plan.rss_requests)} "
            f"proxied calls at concurrency {plan.throughput_concurrency}:",
            phase_rss(proxied, plan, meter),
        )
    # Other programs' CPU: measured up to a restart (whose processes the meter then changes),
    # and from then on inside each of the worker comparison's windows.
    main_seconds = time.perf_counter() - t_start
    results["other_cpu_percent"] = meter.other_percent(start, meter.snapshot(), main_seconds)
    if plan.workers_compare and restart is not None:
        results["workers"] = await phase(
            "workers",
            f"maximum throughput by web workers ({', '.join(map(str, plan.workers_compare))}), "
            "the gateway started again for each:",
            phase_workers(proxied, plan, meter, restart),
        )
        runs = [(results["other_cpu_percent"], main_seconds)] + [
            (row.get("other_cpu_percent"), plan.throughput_seconds)
            for row in results["workers"]["by_workers"]
        ]
        if all(p is not None for p, _ in runs):
            results["other_cpu_percent"] = sum(p * t for p, t in runs) / sum(t for _, t in runs)
    results["phase_seconds"] = phase_seconds
    return results


# ---- command line ----------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Measure the latency, TTFT and throughput the gateway adds over a direct "
        "call to the same upstream.",
    )
    p.add_argument("--quick", action="store_true", help="tiny sample sizes: a smoke run")
    p.add_argument("--requests", type=int, help="requests per side per concurrency level")
    p.add_argument("--concurrency", default="1,16,64", help="comma-separated levels")
    p.add_argument("--warmup", type=int, help="discarded requests per side before measuring")
    p.add_argument("--ttft-requests", type=int, help="streaming requests per side")
    p.add_argument("--token-delay-ms", type=float, default=5.0, help="upstream delay per token")
    p.add_argument("--throughput-seconds", type=float, help="measured window per side")
    p.add_argument(
        "--throughput-concurrency",
        default="16,64",
        help="comma-separated levels of the max-throughput phase; the highest is the headline, "
        "and its rps must stay >= 95%% of the lowest's",
    )
    p.add_argument(
        "--rss-requests",
        help="comma-separated proxied call counts after which the web worker's RSS is read "
        "(default 10000,100000; --quick 200,1000; empty: skip the memory phase)",
    )
    p.add_argument(
        "--client", choices=("raw", "httpx"), default="raw", help="load generator HTTP client"
    )
    p.add_argument(
        "--no-calibration", action="store_true", help="skip the raw-vs-httpx client comparison"
    )
    p.add_argument(
        "--serve-args",
        default=None,
        help="extra arguments for `manage.py serve` (default: none; with --quick "
        "'--no-worker --no-beat')",
    )
    scaled = p.add_argument_group("scaled out (Postgres and Redis)")
    scaled.add_argument(
        "--scaled",
        action="store_true",
        help="start the gateway with DATABASE_URL and REDIS_URL (the database is created "
        "afresh, migrated, and dropped at the end)",
    )
    scaled.add_argument("--database-url", default=DEFAULT_DATABASE_URL)
    scaled.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    scaled.add_argument(
        "--workers", type=int, default=1, help="web workers (`serve --workers`; > 1 needs --scaled)"
    )
    scaled.add_argument(
        "--workers-compare",
        default="",
        metavar="N,M",
        help="after the other phases, max throughput with each worker count, the gateway "
        "started again for each (e.g. 1,2)",
    )
    pin = p.add_argument_group("CPU pinning (Linux)")
    pin.add_argument(
        "--gateway-cpu",
        type=int,
        help="core for the gateway (default 1; with several web workers nothing is pinned "
        "unless a core is given)",
    )
    pin.add_argument(
        "--load-cpu", type=int, help="core for the fake upstream and load generator (default 0)"
    )
    pin.add_argument("--no-pin", action="store_true", help="let the scheduler place everything")
    ext = p.add_argument_group("measure already-running servers")
    ext.add_argument("--upstream-url", help="OpenAI base URL of the upstream, e.g. http://h:p/v1")
    ext.add_argument("--gateway-url", help="base URL of a running gateway (needs --upstream-url)")
    ext.add_argument(
        "--token",
        default=os.environ.get("LLMROTATE_BENCH_TOKEN"),
        help="client token for --gateway-url (default: $LLMROTATE_BENCH_TOKEN)",
    )
    ext.add_argument("--upstream-key", default=UPSTREAM_KEYS[0], help="key for direct calls")
    ext.add_argument("--model", default=ROUTE_MODEL, help="model / route name to call")
    out = p.add_argument_group("output")
    out.add_argument("--output", help="JSON path (default: bench/results/proxy_overhead-DATE.json)")
    out.add_argument("--keep-data", action="store_true", help="keep the gateway's data dir")
    out.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    out.add_argument(
        "--wait-quiet",
        type=float,
        default=0,
        metavar="SECONDS",
        help="first wait up to this long for other programs to leave the CPUs alone",
    )
    args = p.parse_args(argv)
    if args.gateway_url and not args.upstream_url:
        p.error("--gateway-url needs --upstream-url: the direct baseline is the gateway's upstream")
    if args.gateway_url and not args.token:
        p.error("--gateway-url needs --token (or LLMROTATE_BENCH_TOKEN)")
    args.levels = _int_list(p, "--concurrency", args.concurrency)
    args.throughput_levels = sorted(
        set(_int_list(p, "--throughput-concurrency", args.throughput_concurrency))
    )
    if not args.levels or not args.throughput_levels:
        p.error("--concurrency and --throughput-concurrency need at least one level")
    rss = (
        args.rss_requests
        if args.rss_requests is not None
        else ("200,1000" if args.quick else "10000,100000")
    )
    args.rss_counts = _int_list(p, "--rss-requests", rss)
    if args.rss_counts != sorted(set(args.rss_counts)):
        p.error("--rss-requests must be increasing")
    args.compare_workers = _int_list(p, "--workers-compare", args.workers_compare)
    if args.workers < 1:
        p.error("--workers must be >= 1")
    if max([args.workers, *args.compare_workers]) > 1 and not args.scaled:
        p.error("several web workers need --scaled: `serve` refuses them without REDIS_URL")
    if args.scaled and (args.gateway_url or args.upstream_url):
        p.error("--scaled starts its own gateway and upstream")
    if args.serve_args is None:
        # The smoke run skips the Celery worker and beat: they are off the request path, and
        # starting and stopping two more interpreters is a third of its time budget.
        args.serve_args = "--no-worker --no-beat" if args.quick else ""
    return args


def _int_list(p: argparse.ArgumentParser, flag: str, text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        p.error(f"{flag} must be comma-separated integers")
    if any(v < 1 for v in values):
        p.error(f"{flag} takes values >= 1")
    return values


def make_plan(args: argparse.Namespace) -> Plan:
    # Full defaults size the run to ~4-7 minutes at ~300-900 proxied rps, most of it the
    # memory phase's 100,000 calls. --quick keeps every phase but shrinks it to a smoke test.
    quick = args.quick
    return Plan(
        requests=args.requests or (60 if quick else 1500),
        concurrency=args.levels,
        warmup=args.warmup if args.warmup is not None else (20 if quick else 200),
        ttft_requests=args.ttft_requests or (10 if quick else 200),
        token_delay_ms=args.token_delay_ms,
        throughput_seconds=args.throughput_seconds or (0.6 if quick else 8.0),
        throughput_ramp=0.2 if quick else 1.0,
        throughput_concurrency=args.throughput_levels[-1],
        throughput_levels=args.throughput_levels,
        rss_requests=args.rss_counts,
        workers_compare=args.compare_workers,
        client=args.client,
        calibrate=not (quick or args.no_calibration),
        quick=quick,
    )


def others_busy_percent(seconds: float) -> float | None:
    """CPU used by every program but this one over the next ``seconds``, in % of one core."""
    before = (machine_busy_seconds(), cpu_seconds(os.getpid()))
    time.sleep(seconds)
    after = (machine_busy_seconds(), cpu_seconds(os.getpid()))
    if any(v is None for v in (*before, *after)):
        return None  # no /proc
    (machine0, mine0), (machine1, mine1) = before, after
    return ((machine1 or 0) - (machine0 or 0) - ((mine1 or 0) - (mine0 or 0))) / seconds * 100


def wait_for_quiet_machine(timeout: float) -> None:
    """Wait until other programs use less than BUSY_MACHINE_PERCENT of a core for 3 s.

    On a shared 2-core machine (CI, several developers' test suites) a benchmark started
    next to a test run measures the test run. Gives up after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while (others := others_busy_percent(3.0)) is not None and others >= BUSY_MACHINE_PERCENT:
        if time.monotonic() > deadline:
            print(f"warning: machine still busy ({others:.0f}% of a core), going ahead")
            return
        print(
            f"waiting for a quiet machine: other programs use {others:.0f}% of a core", flush=True
        )


def _sigterm_as_sigint(_signum: int, _frame: object) -> None:
    # SIGTERM takes Ctrl-C's path: inside the event loop asyncio cancels the main task
    # cleanly (an exception raised from a signal handler would surface in whatever transport
    # callback it hit), outside it KeyboardInterrupt; either way the servers are stopped.
    signal.raise_signal(signal.SIGINT)


def _run_loop(coro: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
    """uvloop if available (as the servers use), so the client costs as little as it can."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = make_plan(args)
    signal.signal(signal.SIGTERM, _sigterm_as_sigint)
    # Ctrl-C must stop the run and its servers even when started from a shell that made the
    # job ignore SIGINT (background jobs of a non-interactive shell do).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    usable = os.sched_getaffinity(0)
    several = max([args.workers, *plan.workers_compare]) > 1
    explicit = args.gateway_cpu is not None or args.load_cpu is not None
    pin = not args.no_pin and len(usable) >= 2 and (explicit or not several)
    pin_note = None
    if not args.no_pin and len(usable) < 2:
        print("warning: fewer than 2 usable cores, not pinning", file=sys.stderr)
    elif several and not pin and not args.no_pin:
        # Two web workers cannot both have a core to themselves when the upstream and the
        # load generator need one too: the scheduler places everything instead.
        pin_note = "off: several web workers cannot have a core each; --gateway-cpu pins anyway"
    gateway_cpu_arg = 1 if args.gateway_cpu is None else args.gateway_cpu
    load_cpu_arg = 0 if args.load_cpu is None else args.load_cpu
    if pin and not {gateway_cpu_arg, load_cpu_arg} <= usable:
        print(f"error: cores must be among {sorted(usable)}", file=sys.stderr)
        return 2
    # A gateway we did not start is not ours to pin; only the load generator is then.
    gateway_cpu = gateway_cpu_arg if pin and not args.gateway_url else None
    load_cpu = load_cpu_arg if pin else None

    if args.wait_quiet > 0:
        try:
            wait_for_quiet_machine(args.wait_quiet)
        except KeyboardInterrupt:
            return 130
    stack = Stack.create(keep_data=args.keep_data)
    started = dt.datetime.now(dt.UTC)
    t0 = time.perf_counter()
    records: int | None = None
    serve_args = args.serve_args.split()
    try:
        if args.scaled:
            stack.scale_out(args.database_url, args.redis_url)
        upstream_url = args.upstream_url
        if not upstream_url:
            stack.start_upstream(cpu=load_cpu)
            upstream_url = stack.upstream_url
        gateway_url, token = args.gateway_url, args.token
        if not gateway_url:
            stack.configure_gateway(upstream_url)
            stack.start_gateway(cpu=gateway_cpu, extra_args=serve_args, workers=args.workers)
            gateway_url, token = stack.gateway_url, stack.token
        if load_cpu is not None:
            os.sched_setaffinity(0, {load_cpu})  # after the setup commands, which may use both
        base = gateway_url.rstrip("/")
        direct = Target("direct", upstream_url.rstrip("/"), args.upstream_key, args.model)
        proxied = Target(
            "proxied", base if base.endswith("/v1") else f"{base}/v1", token, args.model
        )

        def groups() -> Pids:
            found: Pids = {"loadgen": (os.getpid(),)}
            if stack.upstream_pid:
                found["upstream"] = (stack.upstream_pid,)
            if stack.gateway_pid:
                found["gateway"] = stack.web_pids
                found["gateway_helpers"] = stack.helper_pids()
            return found

        def restart(workers: int) -> tuple[Pids, Target]:
            stack.stop_gateway()
            stack.start_gateway(cpu=gateway_cpu, extra_args=serve_args, workers=workers)
            return groups(), replace(proxied, base_url=stack.gateway_url)

        meter = CpuMeter(groups(), owns_all=not (args.gateway_url or args.upstream_url))
        print(f"upstream {direct.base_url}  gateway {proxied.base_url}", flush=True)
        if args.scaled:
            print(
                f"scaled out: {args.workers} web worker(s), Postgres {args.database_url}, "
                f"Redis {args.redis_url} (prefix {stack.redis_prefix})",
                flush=True,
            )
        print(
            f"pinning: gateway -> core {gateway_cpu}, upstream + load generator -> core {load_cpu}"
            if pin
            else f"pinning: {pin_note or 'off'}",
            flush=True,
        )
        setup_seconds = round(time.perf_counter() - t0, 1)
        results = _run_loop(
            measure(
                direct,
                proxied,
                plan,
                upstream_url,
                meter,
                restart if stack.gateway_pid is not None else None,
            )
        )
        results["phase_seconds"] = {"setup": setup_seconds, **results["phase_seconds"]}
        if stack.gateway_pid is not None:
            stack.stop_gateway()  # a graceful stop flushes the record buffer
            records = stack.records_written()
    except ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; stopping the servers", file=sys.stderr)
        return 130
    finally:
        stack.close()

    report: dict[str, Any] = {
        "benchmark": "proxy_overhead",
        "schema": 2,
        "started_at": started.isoformat(timespec="seconds"),
        "duration_seconds": round(time.perf_counter() - t0, 1),
        "machine": machine_info(len(usable)),
        "setup": {
            "gateway": "external"
            if args.gateway_url
            else f"manage.py serve {args.serve_args}".strip(),
            "mode": "scaled" if args.scaled else ("external" if args.gateway_url else "embedded"),
            "database": None if args.gateway_url else stack.database_label,
            "redis": args.redis_url if args.scaled else None,
            "web_workers": None if args.gateway_url else args.workers,
            "pinning": {"gateway_cpu": gateway_cpu, "load_cpu": load_cpu, "note": pin_note},
            "call_records_written": records,
            "proxied_calls_answered": COMPLETED["proxied"],
            "plan": asdict(plan),
        },
        "results": results,
    }
    report["targets"] = evaluate_targets(results)
    print()
    print(markdown(report))
    path = output_path(args.output, quick=plan.quick)
    write_json(report, path)
    print(f"\nresults written to {path} ({report['duration_seconds']} s)")
    if records is not None:
        print(
            f"the gateway wrote {records} call records to {stack.database_label} for "
            f"{COMPLETED['proxied']} proxied calls it answered"
        )
        if records < COMPLETED["proxied"]:
            print("warning: fewer call records than answered calls", file=sys.stderr)
    other = results.get("other_cpu_percent")
    if other is not None and other > BUSY_MACHINE_PERCENT:
        print(
            f"warning: other programs used {other:.0f}% of a core during the run; "
            "the numbers are skewed, rerun on a quiet machine",
            file=sys.stderr,
        )
    missed = [t["name"] for t in report["targets"] if not t["met"]]
    if missed:
        print(f"targets missed: {'; '.join(missed)}", file=sys.stderr)
    if args.check and missed:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
