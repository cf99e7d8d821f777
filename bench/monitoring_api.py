"""Monitoring API and dashboard at 10 million call records: seed (or reuse) a Postgres database,
then time every endpoint and dashboard page over a 30-day window, and the export's rows per
second.

    .venv/bin/python bench/monitoring_api.py                 # 10M records, 20 runs each
    .venv/bin/python bench/monitoring_api.py --quick         # 200k records, smoke run

Method (docs/benchmarks.md, "Monitoring API at 10 million records"): the database
`llmrotate_bench` on the Postgres at --pg (default 127.0.0.1:5432, user postgres) is seeded
with `manage.py seed_usage` in --workers parallel shards, through the production write path
(records and rollups in one transaction per 10k batch), then VACUUM ANALYZE'd. Each request
goes through Django's full stack in this process (middleware, session auth, ninja, JSON), via
the test client: "server time" is the time from request to the last byte of the body, with no
network. Each endpoint is called twice to warm up, then --runs times; p50 and p95 are nearest
rank. Results go to stdout as Markdown and to bench/results/monitoring_api-<date>.json;
--check exits 1 when a target is missed (API p95 150 ms, overview page p95 300 ms, export
50,000 rows/s).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TARGET_P95_MS = 150.0
TARGET_EXPORT_ROWS_PER_S = 50_000
# The dashboard's pages render every panel server-side on first load; the overview has a
# target of its own (issue: "server time for the overview ... under 300 ms").
TARGET_DASHBOARD_P95_MS = 300.0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=10_000_000)
    parser.add_argument("--days", type=float, default=30)
    parser.add_argument("--database", default="llmrotate_bench")
    parser.add_argument("--pg", default="postgres://postgres@127.0.0.1:5432")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2, help="parallel seeding processes")
    parser.add_argument("--reseed", action="store_true", help="drop and seed again")
    parser.add_argument("--no-full-export", action="store_true", help="skip the 30-day export")
    parser.add_argument("--quick", action="store_true", help="200k records, 5 runs")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0,
        metavar="SECONDS",
        help="on a shared machine: wait up to this long for a 1-minute load average below 1",
    )
    args = parser.parse_args()
    if args.quick:
        args.records, args.runs, args.database = 200_000, 5, args.database + "_quick"
    return args


def nearest_rank(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[max(1, math.ceil(p / 100 * len(ordered))) - 1]


def ensure_database(args: argparse.Namespace) -> None:
    import psycopg

    with psycopg.connect(f"{args.pg}/postgres", autocommit=True) as conn:
        exists = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", [args.database]
        ).fetchone()
        if exists and args.reseed:
            conn.execute(f'DROP DATABASE "{args.database}"')
            exists = None
        if not exists:
            conn.execute(f'CREATE DATABASE "{args.database}"')


def seed_if_needed(args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM usage_callrecord")
        have = cursor.fetchone()[0]
    if have >= args.records:
        print(f"reusing {have:,} call records in {args.database}", file=sys.stderr)
        return {"seeded": False, "records": have}
    if have:
        sys.exit(f"{args.database} holds {have:,} records, fewer than asked: use --reseed")
    end = datetime.now(UTC).replace(second=0, microsecond=0).isoformat()
    started = time.monotonic()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "manage.py",
                "seed_usage",
                f"--records={args.records}",
                f"--days={args.days}",
                f"--end={end}",
                f"--shard={k}/{args.workers}",
            ],
            cwd=ROOT,
            env=env,
        )
        for k in range(1, args.workers + 1)
    ]
    if any(p.wait() for p in procs):
        sys.exit("seeding failed")
    seconds = time.monotonic() - started
    print(f"seeded {args.records:,} records in {seconds:,.0f}s", file=sys.stderr)
    return {"seeded": True, "records": args.records, "seconds": round(seconds, 1)}


def vacuum_analyze() -> None:
    # Fresh tables have no statistics and no visibility map: production tables get both from
    # autovacuum, so the benchmark does the same explicitly before measuring.
    from django.db import connection

    with connection.cursor() as cursor:
        for table in ("usage_callrecord", "usage_rollup_minute", "usage_rollup_hour",
                      "usage_rollup_day", "usage_rollup_session", "usage_rollup_tool"):  # fmt: skip
            cursor.execute(f"VACUUM ANALYZE {table}")


def ensure_keys() -> None:
    """Providers, keys, routes and clients matching the seeded traffic, for /api/keys etc."""
    from keys.models import ApiKey, ClientToken, Provider
    from keys.services import api_key_save, client_token_create
    from usage.seeding import CLIENTS, PROVIDERS

    for name, (kind, key_ids) in PROVIDERS.items():
        provider, _ = Provider.objects.get_or_create(
            name=name, defaults={"kind": kind, "base_url": f"https://{name}.example.test/v1"}
        )
        for key_id in key_ids:
            if not ApiKey.objects.filter(key_id=key_id).exists():
                secret = f"sk-bench-{key_id}-{os.urandom(12).hex()}"
                api_key_save(api_key=ApiKey(key_id=key_id, provider=provider), secret=secret)
    for profile in CLIENTS:
        if not ClientToken.objects.filter(name=profile.name).exists():
            client_token_create(name=profile.name, routes=["*"], scopes=["proxy"])


def machine() -> dict[str, Any]:
    import django
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SHOW server_version")
        pg = cursor.fetchone()[0]
        cursor.execute("SHOW shared_buffers")
        shared_buffers = cursor.fetchone()[0]
    cpu = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(memory, 1),
        "python": platform.python_version(),
        "django": django.get_version(),
        "postgres": pg,
        "shared_buffers": shared_buffers,
    }


def sizes() -> dict[str, Any]:
    from django.db import connection

    out: dict[str, Any] = {}
    with connection.cursor() as cursor:
        for table in ("usage_callrecord", "usage_rollup_minute", "usage_rollup_hour",
                      "usage_rollup_day", "usage_rollup_session", "usage_rollup_tool"):  # fmt: skip
            cursor.execute(
                "SELECT reltuples::bigint, pg_size_pretty(pg_total_relation_size(%s)) "
                "FROM pg_class WHERE relname = %s",
                [table, table],
            )
            rows, size = cursor.fetchone()
            out[table] = {"rows": rows, "size": size}
    return out


def time_endpoint(client: Any, path: str, runs: int) -> dict[str, Any]:
    samples = []
    status = None
    for i in range(runs + 2):
        started = time.perf_counter()
        response = client.get(path)
        if response.streaming:
            b"".join(response.streaming_content)
        else:
            response.content  # noqa: B018 - read the whole body
        elapsed = (time.perf_counter() - started) * 1000
        status = response.status_code
        if i >= 2:
            samples.append(elapsed)
    return {
        "path": path,
        "status": status,
        "p50_ms": round(nearest_rank(samples, 50), 1),
        "p95_ms": round(nearest_rank(samples, 95), 1),
        "max_ms": round(max(samples), 1),
    }


def time_export(client: Any, path: str) -> dict[str, Any]:
    started = time.perf_counter()
    response = client.get(path)
    rows = 0
    size = 0
    peak_chunk = 0
    first_record_count = 0
    for chunk in response.streaming_content:
        if not size:
            found = re.search(rb'"record_count": ?(\d+)', chunk)
            if path.startswith("/v1/usage/export") and not found:
                sys.exit(f"{path}: no record_count in the first chunk")
            first_record_count = int(found[1]) if found else 0
        rows += chunk.count(b"\n")
        size += len(chunk)
        peak_chunk = max(peak_chunk, len(chunk))
    seconds = time.perf_counter() - started
    if path.startswith("/v1/usage/export"):
        rows = first_record_count  # one JSON document: its head says how many records follow
    elif "format=csv" in path or "format=json&" in path or path.endswith("format=json"):
        rows -= 1  # the CSV header line (JSON: the closing bracket's line)
    return {
        "path": path,
        "rows": rows,
        "seconds": round(seconds, 2),
        "rows_per_second": round(rows / seconds),
        "megabytes": round(size / 2**20, 1),
        "largest_chunk_kib": round(peak_chunk / 1024, 1),
    }


def main() -> None:
    args = parse_args()
    ensure_database(args)
    url = f"{args.pg}/{args.database}"
    env = {**os.environ, "DATABASE_URL": url, "LLMROTATE_USAGE_LOG_LEVEL": "WARNING"}
    os.environ.update(env)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llmrotate_site.settings")
    sys.path.insert(0, str(ROOT))
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=ROOT, env=env, check=True)

    import django

    django.setup()
    from django.contrib.auth.models import Permission, User
    from django.test import Client
    from django.test.utils import setup_test_environment

    from usage.models import CallRecord

    seeding = seed_if_needed(args, env)
    vacuum_analyze()
    ensure_keys()
    setup_test_environment()  # lets the test client's host through ALLOWED_HOSTS
    staff, _ = User.objects.get_or_create(username="bench-staff", defaults={"is_staff": True})
    # What a monitoring user needs since #18 (docs/security.md).
    staff.user_permissions.add(Permission.objects.get(codename="view_callrecord"))
    client = Client()
    client.force_login(staff)

    failover = (
        CallRecord.objects.filter(attempt__gte=3).order_by("-started_at").values_list(
            "request_id", flat=True
        ).first()
    )  # fmt: skip
    deep = client.get("/api/usage/recent?window=30d&limit=100")
    for _ in range(20):  # a cursor 2,000 records deep
        deep = client.get(
            f"/api/usage/recent?window=30d&limit=100&cursor={deep.json()['next_cursor']}"
        )
    cursor = deep.json()["next_cursor"]
    # A session and the start of a week, for LLM Interactive Proxy's endpoints.
    session = (
        CallRecord.objects.exclude(session_id="").order_by("-started_at").values_list(
            "session_id", flat=True
        ).first()
    )  # fmt: skip
    week = (datetime.now(UTC) - timedelta(days=7)).strftime("%Y-%m-%dT%H:%M:%SZ")
    day = (datetime.now(UTC) - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")

    w = "window=30d"
    paths = [
        "/api/health",
        "/api/keys",
        "/api/config",
        f"/api/usage?{w}",
        f"/api/usage/models?{w}",
        f"/api/usage/stats?{w}",
        f"/api/usage/stats?{w}&provider=openai",
        f"/api/usage/stats?{w}&client=web-app&status=error&stream=true",
        f"/api/usage/stats?{w}&model=claude-sonnet&key=anthropic-2",
        f"/api/usage/clients?{w}",
        f"/api/usage/timeseries?{w}",
        f"/api/usage/timeseries?{w}&provider=anthropic&status=error",
        f"/api/usage/timeseries?{w}&bucket=1h",
        "/api/usage/timeseries?window=24h",
        "/api/usage/stats?window=1h",
        f"/api/usage/recent?{w}&limit=100",
        f"/api/usage/recent?{w}&limit=100&cursor={cursor}",
        f"/api/usage/recent?{w}&limit=50&client=ci&status=error",
        f"/api/events?{w}&limit=100",
        f"/api/usage/stats?{w}&upstream_model=gpt-4o&http_status=200",
        f"/api/usage/models?{w}&by=upstream_model",
        f"/api/usage/reconciliation?{w}",
        f"/api/usage/recent?{w}&limit=100&session_id={session}",
        "/v1/usage/stats",
        "/v1/usage/stats?backend_type=openai",
        f"/v1/usage/stats?start_date={week}&model=claude-sonnet&http_status_code=200",
        f"/v1/usage/stats?session_id={session}",
        "/v1/usage/stats?user_agent=curl/8.5.0",
        "/v1/usage/recent?limit=100",
        "/v1/usage/recent?limit=100&offset=2000&backend_type=anthropic",
        f"/v1/usage/recent?session_id={session}",
        f"/api/requests/{failover}",
    ]
    # (page, its p95 target in ms, or None: only the overview has one; the others must load).
    pages: list[tuple[str, float | None]] = [
        (f"/dashboard/?{w}", TARGET_DASHBOARD_P95_MS),
        (f"/dashboard/keys/?{w}", None),
        (f"/dashboard/health/?{w}", None),
        (f"/dashboard/calls/?{w}", None),
        (f"/dashboard/clients/?{w}", None),
        (f"/dashboard/calls/{failover}/", None),
    ]
    deadline = time.monotonic() + args.wait_quiet
    while os.getloadavg()[0] >= 1.0 and time.monotonic() < deadline:
        time.sleep(5)
    load_before = os.getloadavg()
    results = []
    for path in paths:
        result = time_endpoint(client, path, args.runs)
        results.append(result)
        print(f"{result['p50_ms']:8.1f} {result['p95_ms']:8.1f}  {path}", file=sys.stderr)
    dashboard = []
    for path, _ in pages:
        result = time_endpoint(client, path, args.runs)
        dashboard.append(result)
        print(f"{result['p50_ms']:8.1f} {result['p95_ms']:8.1f}  {path}", file=sys.stderr)

    exports = [
        time_export(client, "/api/usage/export?window=24h&format=csv"),
        time_export(client, "/api/usage/export?window=24h&format=jsonl"),
        time_export(client, f"/v1/usage/export?start_date={day}"),
    ]
    if not args.no_full_export:
        for fmt in ("csv", "jsonl", "json"):
            exports.append(time_export(client, f"/api/usage/export?{w}&format={fmt}"))
    for export in exports:
        print(f"{export['rows_per_second']:>10,} rows/s  {export['path']}", file=sys.stderr)

    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],  # noqa: S607
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip(),
        "machine": machine(),
        "seeding": seeding,
        "tables": sizes(),
        "runs": args.runs,
        # Other work on the machine inflates every figure; the 1-minute load average before
        # and after the measurements says how much there was.
        "load_average": {"before": load_before[0], "after": os.getloadavg()[0]},
        "endpoints": results,
        "dashboard": dashboard,
        "exports": exports,
    }
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    suffix = "-quick" if args.quick else ""
    (out / f"monitoring_api-{datetime.now(UTC):%Y%m%d}{suffix}.json").write_text(
        json.dumps(report, indent=2) + "\n"
    )
    missed: list[str] = []
    print("\n| endpoint | p50 ms | p95 ms |\n|---|---:|---:|")
    for r in results:
        ok = r["p95_ms"] < TARGET_P95_MS and r["status"] == 200
        if not ok:
            missed.append(r["path"])
        print(f"| `{r['path']}` | {r['p50_ms']} | {r['p95_ms']}{'' if ok else ' ⚠'} |")
    print("\n| dashboard page | p50 ms | p95 ms |\n|---|---:|---:|")
    for (_, target), r in zip(pages, dashboard, strict=True):
        ok = r["status"] == 200 and (target is None or r["p95_ms"] < target)
        if not ok:
            missed.append(r["path"])
        print(f"| `{r['path']}` | {r['p50_ms']} | {r['p95_ms']}{'' if ok else ' ⚠'} |")
    print("\n| export | rows | seconds | rows/s |\n|---|---:|---:|---:|")
    for e in exports:
        ok = e["rows_per_second"] >= TARGET_EXPORT_ROWS_PER_S
        if not ok:
            missed.append(e["path"])
        print(
            f"| `{e['path']}` | {e['rows']:,} | {e['seconds']} | {e['rows_per_second']:,}"
            f"{'' if ok else ' ⚠'} |"
        )
    if missed:
        print(f"\ntargets missed: {', '.join(missed)}", file=sys.stderr)
        if args.check:
            sys.exit(1)


if __name__ == "__main__":
    main()
