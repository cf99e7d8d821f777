"""What do a client's limits add to a call? Issue #14's target: with three limits on the client,
the added p50 stays within 0.3 ms of a call without limits with Redis on loopback, and within
0.05 ms embedded.

Each run starts one fake upstream and two gateways (`manage.py serve --no-worker --no-beat`,
call recording on, SQLite in both):

- `embedded`: the default, limits counted in the web process (`MemoryLimiter`);
- `scaled`: REDIS_URL on 127.0.0.1 with a prefix of its own, so key state and the limits'
  counters live in Redis (`RedisLimiter`, one Lua script per check) as in the scaled-out mode.
  The database stays SQLite: limits never touch the database on the request path, and the
  recorder thread writes the same records either way.

Each gateway has two clients on the same route: `bench`, without limits, and `bench-limited`,
with requests_per_minute, tokens_per_minute and max_concurrent set far above what the run
sends (so nothing is refused, and every request is still checked, reserved, settled and its
concurrency slot taken and given back). Comparing two clients of one process rather than two
processes leaves out the ±0.05 ms by which two gateways configured alike differ.

Requests go to each target in rotating blocks (direct, then each client of each gateway; then
the order turned around), at concurrency 1 and 16. The figure asked for is each limited
client's added p50 (minus the direct call's in the same run) minus that of the same gateway's
unlimited client. Several runs (fresh servers each time) show the spread. docs/benchmarks.md
has the method and the results.

    .venv/bin/python bench/limits_overhead.py                        # 3 runs, ~6 minutes
    .venv/bin/python bench/limits_overhead.py --quick --modes embedded  # smoke run, no Redis
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import sys
import time
import uuid
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
from loadgen import Pool, Target, run_count
from report import machine_info
from servers import (
    ROUTE_MODEL,
    UPSTREAM_KEYS,
    ServerError,
    Stack,
    cpu_seconds,
    machine_busy_seconds,
    rotate_targets,
)

MODES = ("embedded", "scaled")
FAST_SCRIPT = {"default": {"latency_ms": 0, "token_delay_ms": 0, "completion_tokens": 16}}
LIMITED_CLIENT = "bench-limited"
# Far above anything one worker can send (~600 requests/s, ~1,050 tokens reserved each: the
# short prompt plus LLMROTATE_LIMITS_DEFAULT_MAX_TOKENS), so no request is ever refused.
LIMITS = {"requests_per_minute": 10_000_000, "tokens_per_minute": 2_000_000_000}
MAX_CONCURRENT = 1_000
LIMITS_CONFIG = f"""\
  - {{name: {LIMITED_CLIENT}, routes: ["*"], scopes: [proxy]}}
limits:
  - {{client: {LIMITED_CLIENT}, requests_per_minute: {LIMITS["requests_per_minute"]}, \
tokens_per_minute: {LIMITS["tokens_per_minute"]}, max_concurrent: {MAX_CONCURRENT}}}
"""
# The bounds on (limited client's added p50) - (unlimited client's added p50).
TARGET_MS = {"embedded": 0.05, "scaled": 0.3}
# Above this much CPU used by other programs (% of one core) the run is flagged as skewed.
BUSY_MACHINE_PERCENT = 10.0


def configure(stack: Stack, upstream_url: str) -> dict[str, str]:
    """The bench config plus the limited client and its limits; each client's token."""
    return stack.configure_gateway(
        upstream_url, extra=LIMITS_CONFIG, clients=("bench", LIMITED_CLIENT)
    )


async def check_limits_apply(targets: dict[str, Target]) -> None:
    """One call per gateway client before measuring: the limited client's answer carries the
    limits' `x-ratelimit-*` headers, the other's does not. Otherwise the run would compare two
    unlimited clients and report that limits cost nothing."""
    async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
        for name, target in targets.items():
            if name == "direct":
                continue
            response = await client.post(
                target.url, content=target.body(stream=False), headers=target.headers()
            )
            if response.status_code != 200:
                raise ServerError(f"{name}: status {response.status_code}: {response.text[:300]}")
            limit = response.headers.get("x-ratelimit-limit-requests")
            expected = str(LIMITS["requests_per_minute"]) if name.endswith("_limits") else None
            if limit != expected:
                raise ServerError(
                    f"{name}: x-ratelimit-limit-requests is {limit!r}, expected {expected!r}"
                )


def redis_keys(url: str, prefix: str) -> int:
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        return sum(1 for _ in client.scan_iter(match=f"{prefix}lim:*", count=500))
    finally:
        client.close()


def redis_cleanup(url: str, prefix: str) -> None:
    """Delete what the run left in Redis (only under its own prefix)."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        batch = list(client.scan_iter(match=f"{prefix}*", count=500))
        for i in range(0, len(batch), 500):
            client.delete(*batch[i : i + 500])
    finally:
        client.close()


async def rotate(
    pools: dict[str, Pool], total: int, pids: dict[str, int], baselines: dict[str, str]
) -> dict[str, Any]:
    """servers.rotate_targets, and each limited client's figures over its gateway's unlimited
    client (`baselines`: limited target -> unlimited target)."""
    out = await rotate_targets(pools, total, pids)
    for name, base in baselines.items():
        row = out[name]
        for q in ("p50", "p99"):
            row[f"added_{q}_vs_no_limits"] = row[f"added_{q}"] - out[base][f"added_{q}"]
        if "cpu_ms_per_request" in row and "cpu_ms_per_request" in out[base]:
            row["cpu_ms_vs_no_limits"] = row["cpu_ms_per_request"] - out[base]["cpu_ms_per_request"]
    return out


async def measure(
    targets: dict[str, Target],
    pids: dict[str, int],
    baselines: dict[str, str],
    requests: int,
    levels: tuple[int, ...],
    warmup: int,
) -> list[dict[str, Any]]:
    results = []
    for concurrency in levels:
        pools = {name: Pool(t, concurrency, "raw") for name, t in targets.items()}
        for pool in pools.values():
            await pool.open()
        try:
            for pool in pools.values():  # warm: caches, upstream pools, lazy imports, Redis
                await run_count(pool, max(warmup, 4 * concurrency))
            level = await rotate(pools, max(requests, concurrency * 16), pids, baselines)
        finally:
            for pool in pools.values():
                await pool.aclose()
        results.append({"concurrency": concurrency, **level})
        print(
            f"  concurrency {concurrency:>2}: direct p50 {level['direct']['p50']:.3f} ms; "
            + "; ".join(
                f"{name} added p50 {level[name]['added_p50']:.3f} ms"
                f" (limits {level[name]['added_p50_vs_no_limits']:+.3f} ms,"
                f" CPU {level[name].get('cpu_ms_vs_no_limits', float('nan')):+.3f} ms/request)"
                for name in baselines
            ),
            flush=True,
        )
    return results


def one_run(
    index: int, modes: tuple[str, ...], redis_url: str, args: argparse.Namespace
) -> dict[str, Any]:
    usable = os.sched_getaffinity(0)
    pin = len(usable) >= 2 and not args.no_pin
    gateway_cpu, load_cpu = (1, 0) if pin else (None, None)
    prefix = f"llmrotate-bench-limits-{uuid.uuid4().hex[:8]}:"
    stacks = {mode: Stack.create(keep_data=False) for mode in modes}
    if "scaled" in stacks:
        stacks["scaled"].env.update(REDIS_URL=redis_url, LLMROTATE_REDIS_PREFIX=prefix)
    busy0, t0 = machine_busy_seconds(), time.perf_counter()
    ours0: float | None = None
    try:
        first = next(iter(stacks.values()))
        first.start_upstream(cpu=load_cpu)
        asyncio.run(_script(first.upstream_url))
        targets = {"direct": Target("direct", first.upstream_url, UPSTREAM_KEYS[0], ROUTE_MODEL)}
        pids: dict[str, int] = {}
        baselines: dict[str, str] = {}
        for mode, stack in stacks.items():
            tokens = configure(stack, first.upstream_url)
            stack.start_gateway(cpu=gateway_cpu, extra_args=["--no-worker", "--no-beat"])
            assert stack.gateway_pid is not None
            limited = f"{mode}_limits"
            targets[mode] = Target(mode, stack.gateway_url, tokens["bench"], ROUTE_MODEL)
            targets[limited] = Target(
                limited, stack.gateway_url, tokens[LIMITED_CLIENT], ROUTE_MODEL
            )
            pids[mode] = pids[limited] = stack.gateway_pid
            baselines[limited] = mode
        if load_cpu is not None:
            os.sched_setaffinity(0, {load_cpu})
        asyncio.run(check_limits_apply(targets))
        ours0 = _our_cpu(stacks)
        busy0, t0 = machine_busy_seconds(), time.perf_counter()
        print(f"run {index + 1}:", flush=True)
        levels = asyncio.run(
            measure(targets, pids, baselines, args.requests, args.levels, args.warmup)
        )
        seconds = time.perf_counter() - t0
        other = _other_percent(busy0, machine_busy_seconds(), ours0, _our_cpu(stacks), seconds)
        counters = redis_keys(redis_url, prefix) if "scaled" in stacks else None
        if counters == 0:
            raise ServerError("the scaled gateway left no limit counters in Redis")
    finally:
        os.sched_setaffinity(0, usable)
        for stack in reversed(list(stacks.values())):
            stack.close()
        if "scaled" in stacks:
            redis_cleanup(redis_url, prefix)
    if other is not None and other > BUSY_MACHINE_PERCENT:
        print(f"  warning: other programs used {other:.0f}% of a core during this run")
    return {
        "run": index + 1,
        "seconds": round(seconds, 1),
        "other_programs_cpu_percent": None if other is None else round(other, 1),
        "redis_limit_keys": counters,
        "levels": levels,
    }


def _our_cpu(stacks: dict[str, Stack]) -> float | None:
    from servers import descendants

    total = cpu_seconds(os.getpid())
    for stack in stacks.values():
        for child in stack.children:
            for pid in (child.pid, *descendants(child.pid)):
                value = cpu_seconds(pid)
                if value is not None and total is not None:
                    total += value
    return total


def _other_percent(
    busy0: float | None, busy1: float | None, ours0: float | None, ours1: float | None, s: float
) -> float | None:
    if None in (busy0, busy1, ours0, ours1) or s <= 0:
        return None
    assert busy0 is not None and busy1 is not None and ours0 is not None and ours1 is not None
    return max(0.0, ((busy1 - busy0) - (ours1 - ours0)) / s * 100)


def table(runs: list[dict[str, Any]], modes: tuple[str, ...]) -> str:
    """Markdown: per level and mode, each run's added p50/p99 without and with limits, and
    the difference; then the spread of the difference and whether the target holds."""
    lines = [
        "| concurrency | mode | run | added p50 / p99, no limits | added p50 / p99, three"
        " limits | limits: p50 / p99 | limits: CPU ms/request |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    verdicts = []
    for li, level in enumerate(runs[0]["levels"]):
        concurrency = level["concurrency"]
        for mode in modes:
            diffs = []
            for run in runs:
                lvl = run["levels"][li]
                off, on = lvl[mode], lvl[f"{mode}_limits"]
                diffs.append(on["added_p50_vs_no_limits"])
                lines.append(
                    f"| {concurrency} | {mode} | {run['run']} |"
                    f" {off['added_p50']:+.3f} / {off['added_p99']:+.3f} |"
                    f" {on['added_p50']:+.3f} / {on['added_p99']:+.3f} |"
                    f" {on['added_p50_vs_no_limits']:+.3f} / {on['added_p99_vs_no_limits']:+.3f} |"
                    f" {on.get('cpu_ms_vs_no_limits', float('nan')):+.3f} |"
                )
            if concurrency == 1:
                verdicts.append(
                    verdict(f"{mode}, concurrency 1: limits add", diffs, TARGET_MS[mode])
                )
    return "\n".join([*lines, "", *verdicts])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    campaign_arguments(p, requests_help="requests per target per level")
    p.add_argument("--modes", default=",".join(MODES), help="embedded,scaled (scaled needs Redis)")
    p.add_argument(
        "--redis-url",
        default="redis://127.0.0.1:6379/0",
        help="Redis of the scaled gateway (keys go under a prefix of the run's own)",
    )
    args = p.parse_args(argv)
    runs_wanted = campaign_defaults(args)
    args.warmup = 50 if args.quick else 200
    modes = tuple(m for m in args.modes.split(",") if m)
    if not modes or set(modes) - set(MODES):
        p.error(f"--modes: choose from {', '.join(MODES)}")
    started = dt.datetime.now(dt.UTC)
    t0 = time.perf_counter()
    runs = campaign_runs(runs_wanted, args, lambda i: one_run(i, modes, args.redis_url, args))
    if runs is None:
        return 1
    report = {
        "benchmark": "limits_overhead",
        "schema": 1,
        "started_at": started.isoformat(timespec="seconds"),
        "duration_seconds": round(time.perf_counter() - t0, 1),
        "machine": machine_info(len(os.sched_getaffinity(0))),
        "setup": {
            "modes": list(modes),
            "database": "sqlite",
            "redis": args.redis_url if "scaled" in modes else None,
            "limits": {**LIMITS, "max_concurrent": MAX_CONCURRENT},
            "requests_per_target_per_level": args.requests,
            "pinning": not args.no_pin and len(os.sched_getaffinity(0)) >= 2,
        },
        "targets_ms": {m: TARGET_MS[m] for m in modes},
        "runs": runs,
    }
    campaign_write("limits_overhead", report, args, table(runs, modes))
    return 0


async def _script(upstream_url: str) -> None:
    from proxy_overhead import script_upstream

    if not await script_upstream(upstream_url, FAST_SCRIPT):
        raise ServerError("could not script the fake upstream")


if __name__ == "__main__":
    raise SystemExit(main())
