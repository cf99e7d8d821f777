"""The benchmarks still run: each in its smoke mode (`--quick`), so that a change that breaks
one is seen in CI rather than on the day someone measures. The figures themselves are not
checked here: speed is measured by the benchmarks (docs/benchmarks.md), not asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Each runs once, in one leg or the other: run() starts the benchmark without the leg's
# DATABASE_URL and REDIS_URL, so the leg changes nothing but where the time is spent. The
# slowest run in the scaled leg, whose other tests take less time, so that the two legs, which
# `make test` runs side by side, end at about the same time.
# The benchmarks' own runs are bounded (300 s at most, below); pytest's default of 120 s is
# not their bound, and a loaded machine (the fault campaign runs beside the legs) can need more.
pytestmark = pytest.mark.timeout(330)
IN_EMBEDDED_LEG = pytest.mark.embedded
IN_SCALED_LEG = pytest.mark.scaled


def run(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=timeout, check=False,
    )  # fmt: skip


@IN_EMBEDDED_LEG
def test_token_counting_benchmark_runs(tmp_path: Path) -> None:
    out = tmp_path / "tokens.json"
    result = run("bench/token_counting.py", "--quick", "--json", str(out), timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(r["counted_prompt_tokens"] > 0 for r in rows), rows
    assert "| prompt |" in result.stdout


@IN_EMBEDDED_LEG
def test_proxy_overhead_benchmark_runs(tmp_path: Path) -> None:
    out = tmp_path / "overhead.json"
    result = run("bench/proxy_overhead.py", "--quick", "--output", str(out), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    # Every phase ran, the memory one included, and every target of issue #15 was judged.
    results = report["results"]
    assert [lvl["concurrency"] for lvl in results["throughput"]["levels"]] == [16, 64]
    assert [pt["requests"] for pt in results["rss"]["points"]] == [0, 200, 1000]
    assert all(pt["rss_mib"] > 0 for pt in results["rss"]["points"])
    assert len(report["targets"]) == 8
    assert all(t["measured"] is not None for t in report["targets"]), report["targets"]
    setup = report["setup"]
    assert setup["call_records_written"] == setup["proxied_calls_answered"] > 0


@IN_SCALED_LEG
def test_proxy_overhead_benchmark_runs_scaled_out(tmp_path: Path) -> None:
    from tests.conftest import REDIS_TEST_URL, redis_available

    leg_database = os.environ.get("DATABASE_URL", "")
    if not leg_database.startswith("postgres"):
        pytest.skip("needs the scaled leg's Postgres (DATABASE_URL)")
    if not redis_available():
        pytest.skip(f"Redis is not reachable at {REDIS_TEST_URL}")
    # A database of its own on the leg's server, named after the leg's: the run drops it.
    database = f"{leg_database.rstrip('/')}_bench_proxy"
    out = tmp_path / "overhead.json"
    result = run(
        "bench/proxy_overhead.py", "--quick", "--scaled", "--database-url", database,
        "--redis-url", REDIS_TEST_URL, "--workers-compare", "1,2", "--concurrency", "1,16",
        "--output", str(out), timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    setup, results = report["setup"], report["results"]
    assert (setup["mode"], setup["database"]) == ("scaled", "Postgres")
    # Every proxied call was recorded in Postgres, across the gateway's restarts.
    assert setup["call_records_written"] == setup["proxied_calls_answered"] > 0
    by_workers = results["workers"]["by_workers"]
    assert [row["workers"] for row in by_workers] == [1, 2]
    assert all(row["rps"] > 0 for row in by_workers)
    assert "pinning: off: several web workers" in result.stdout
    assert [t["key"] for t in report["targets"]] == [
        "rps", "added_p50", "added_p99", "added_ttft_p50", "added_ttft_p99", "cpu",
        "rps_kept", "rss",
    ]  # fmt: skip


@IN_SCALED_LEG
def test_observability_overhead_benchmark_runs(tmp_path: Path) -> None:
    out = tmp_path / "observability.json"
    result = run(
        "bench/observability_overhead.py", "--quick", "--requests", "100", "--output", str(out),
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    # The traced gateways really exported to the collector stand-in.
    assert report["setup"]["otlp_exports_received"]["exports"] > 0
    assert {"off", "metrics", "traced"} <= set(report["levels"][0])


@IN_EMBEDDED_LEG
def test_limits_overhead_benchmark_runs_embedded(tmp_path: Path) -> None:
    out = tmp_path / "limits.json"
    result = run(
        "bench/limits_overhead.py", "--quick", "--modes", "embedded", "--output", str(out),
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (level,) = json.loads(out.read_text())["runs"][0]["levels"]
    assert {"direct", "embedded", "embedded_limits"} <= set(level)
    assert "| 1 | embedded | 1 |" in result.stdout


@IN_SCALED_LEG
def test_limits_overhead_benchmark_runs_with_redis(tmp_path: Path) -> None:
    from tests.conftest import REDIS_TEST_URL, redis_available

    if not redis_available():
        pytest.skip(f"Redis is not reachable at {REDIS_TEST_URL}")
    out = tmp_path / "limits.json"
    result = run(
        "bench/limits_overhead.py", "--quick", "--modes", "scaled", "--redis-url", REDIS_TEST_URL,
        "--output", str(out), timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    # The limited client's counters really were in Redis (the run checks for them, then
    # deletes them).
    assert report["runs"][0]["redis_limit_keys"] > 0
    assert "| 1 | scaled | 1 |" in result.stdout


@IN_EMBEDDED_LEG
def test_translation_overhead_benchmark_runs(tmp_path: Path) -> None:
    out = tmp_path / "translation.json"
    result = run(
        "bench/translation_overhead.py", "--quick", "--output", str(out), timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (level,) = json.loads(out.read_text())["runs"][0]["levels"]
    # Both kinds of call measured all four targets, the translated path included.
    for kind in ("json", "stream"):
        assert {"direct", "direct_messages", "native", "translated"} <= set(level[kind])
        assert level[kind]["translated"]["n"] > 0
    assert "| 1 | stream | 1 |" in result.stdout
    assert "translation adds" in result.stdout


@IN_EMBEDDED_LEG
def test_capture_overhead_benchmark_runs(tmp_path: Path) -> None:
    out = tmp_path / "capture.json"
    result = run(
        "bench/capture_overhead.py", "--quick", "--concurrency", "1", "--output", str(out),
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (run_,) = json.loads(out.read_text())["runs"]
    (level,) = run_["levels"]
    for kind in ("json", "stream"):
        assert {"direct", "capture_off", "capture_on"} <= set(level[kind])
    # Only the captured client's calls are in the files (the run checks it, and fails if not),
    # and they are there.
    assert set(run_["capture_files"]["client_legs_by_client"]) == {"bench-captured"}
    assert run_["capture_files"]["bytes"] > 0
    assert "| 1 | stream | 1 |" in result.stdout
    assert "capture adds" in result.stdout


@IN_SCALED_LEG
def test_replacement_rules_benchmark_runs(tmp_path: Path) -> None:
    out = tmp_path / "replacement.json"
    result = run(
        "bench/replacement_rules.py", "--quick", "--calls", "5000", "--output", str(out),
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    local = report["in_process"]
    # The rules really ran: the never-eligible rule took nothing, the other two drew.
    assert local["by_rule"]["ci-canary"]["eligible"] == 0
    assert 0 < local["replaced_share"] < 1
    (run_,) = report["gateway"]["runs"]
    (level,) = run_["levels"]
    for kind in ("json", "stream"):
        assert {"direct", "plain-4o-mini", "rules-4o-mini"} <= set(level[kind])
    # Through the gateway too: some of the rules route's calls were recorded as replaced.
    assert any(
        key.startswith("rules-4o-mini") and key.endswith(" replaced")
        for key in run_["final_records_by_arm"]
    ), run_["final_records_by_arm"]
    assert "three rules add" in result.stdout
