"""Turn measurements into the report: spec targets, machine info, Markdown tables, JSON file."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from servers import ROOT

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Issue #15's targets for one gateway worker on one core, embedded default, recording on.
TARGET_RPS = 900.0  # at 64 in flight
TARGET_ADDED_P50_MS = 1.2  # concurrency 1
TARGET_ADDED_P99_MS = 5.0
TARGET_ADDED_TTFT_P50_MS = 1.0  # streaming, concurrency 1
TARGET_ADDED_TTFT_P99_MS = 3.0
TARGET_CPU_MS_PER_REQUEST = 1.1  # in the max-throughput window
TARGET_RPS_KEPT_PERCENT = 95.0  # rps at the highest throughput level / at the lowest
TARGET_RSS_GROWTH_PERCENT = 10.0  # web worker RSS, last memory point against the first
# Reference points the targets were set against, on a similar 2-core machine: the best-known
# Python gateway (the first spec's), and the Portkey gateway (Node) on one core (issue #15).
# "" where no figure was given.
PYTHON_REFERENCE = {
    "rps": "60-70 rps",
    "added_p50": "~17 ms",
    "added_ttft_p50": "~20 ms",
}
PORTKEY_REFERENCE = {
    "rps": "613-868 rps",
    "added_p50": "~1.07-1.3 ms",
    "added_p99": "+16.6 ms",
}


def machine_info(usable_cpus: int) -> dict[str, Any]:
    model = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    packages = {}
    for name in ("django", "uvicorn", "uvloop", "httptools", "httpx", "httpcore", "django-ninja"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            packages[name] = metadata.version(name)
    load: tuple[float, float, float] | None = None
    with contextlib.suppress(OSError):
        load = os.getloadavg()
    return {
        "cpu_model": model,
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable_cpus,
        "load_average_at_end": [round(x, 2) for x in load] if load else None,
        "platform": platform.platform(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "packages": packages,
        **git_info(),
    }


def git_info() -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *args],  # noqa: S607 - git from PATH, read-only queries
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            )
        except OSError:
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    # Uncommitted changes mean the commit alone does not say what was measured.
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def _target(
    key: str,
    name: str,
    spec: str,
    measured: float | None,
    unit: str,
    met: bool,
    detail: str = "",
) -> dict[str, Any]:
    return {
        "key": key,
        "name": name,
        "target": spec,
        "measured": measured,
        "unit": unit,
        # A figure the run could not measure (a phase skipped, an external gateway's memory)
        # is a miss: --check passes only on targets shown to be met.
        "met": measured is not None and math.isfinite(measured) and met,
        "detail": detail,
        "reference": PYTHON_REFERENCE.get(key, ""),
        "portkey": PORTKEY_REFERENCE.get(key, ""),
    }


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    c1 = next((lvl for lvl in results["latency"] if lvl["concurrency"] == 1), None)
    added_p50 = c1["added_ms"]["p50"] if c1 else None
    added_p99 = c1["added_ms"]["p99"] if c1 else None
    cpu_c1 = c1.get("gateway_cpu_ms_per_request") if c1 else None
    tp = results["throughput"]
    top = tp["concurrency"]
    rps = tp["proxied"]["rps"]
    cpu = tp["proxied"].get("gateway_cpu_ms_per_request")
    ttft = results["ttft"]["added_ms"]
    levels = tp.get("levels", [])
    ratio = tp.get("proxied_rps_ratio")
    kept = ratio * 100 if ratio is not None else None
    kept_detail = (
        f"{rps:.0f} rps at {top} vs {levels[0]['proxied']['rps']:.0f} rps at "
        f"{levels[0]['concurrency']} in flight"
        if len(levels) > 1
        else "needs two levels in --throughput-concurrency"
    )
    rss = results.get("rss") or {}
    points = rss.get("points", [])
    growth = rss.get("growth_percent")
    if len(points) > 2:
        first, last = points[1], points[-1]
        rss_name = f"web worker RSS, {last['requests']:,} vs {first['requests']:,} calls"
        rss_detail = f"{_num(first['rss_mib'], '.1f')} → {_num(last['rss_mib'], '.1f')} MiB"
    else:
        rss_name, rss_detail = "web worker RSS growth", "memory phase not run"
    return [
        _target(
            "rps",
            f"throughput, one worker on one core, {top} in flight",
            f">= {TARGET_RPS:g} rps",
            rps,
            "rps",
            rps >= TARGET_RPS,
        ),
        _target(
            "added_p50",
            "added latency p50, concurrency 1",
            f"<= {TARGET_ADDED_P50_MS:g} ms",
            added_p50,
            "ms",
            added_p50 is not None and added_p50 <= TARGET_ADDED_P50_MS,
        ),
        _target(
            "added_p99",
            "added latency p99, concurrency 1",
            f"<= {TARGET_ADDED_P99_MS:g} ms",
            added_p99,
            "ms",
            added_p99 is not None and added_p99 <= TARGET_ADDED_P99_MS,
        ),
        _target(
            "added_ttft_p50",
            "added TTFT p50, streaming, concurrency 1",
            f"< {TARGET_ADDED_TTFT_P50_MS:g} ms",
            ttft["p50"],
            "ms",
            ttft["p50"] < TARGET_ADDED_TTFT_P50_MS,
        ),
        _target(
            "added_ttft_p99",
            "added TTFT p99, streaming, concurrency 1",
            f"< {TARGET_ADDED_TTFT_P99_MS:g} ms",
            ttft["p99"],
            "ms",
            ttft["p99"] < TARGET_ADDED_TTFT_P99_MS,
        ),
        _target(
            "cpu",
            f"gateway CPU per request, {top} in flight",
            f"<= {TARGET_CPU_MS_PER_REQUEST:g} ms",
            cpu,
            "ms",
            cpu is not None and cpu <= TARGET_CPU_MS_PER_REQUEST,
            f"concurrency 1: {_num(cpu_c1, '.2f', ' ms')}",
        ),
        _target(
            "rps_kept",
            "throughput kept as concurrency grows",
            f">= {TARGET_RPS_KEPT_PERCENT:g}% of the lowest level's",
            kept,
            "%",
            kept is not None and kept >= TARGET_RPS_KEPT_PERCENT,
            kept_detail,
        ),
        _target(
            "rss",
            rss_name,
            f"within ±{TARGET_RSS_GROWTH_PERCENT:g}%",
            growth,
            "%",
            growth is not None and abs(growth) <= TARGET_RSS_GROWTH_PERCENT,
            rss_detail,
        ),
    ]


def _triple(stats: dict[str, Any]) -> str:
    return f"{stats['p50']:.2f} / {stats['p90']:.2f} / {stats['p99']:.2f}"


def _num(value: float | None, fmt: str = ".2f", suffix: str = "") -> str:
    return f"{value:{fmt}}{suffix}" if value is not None else "n/a"


def markdown(report: dict[str, Any]) -> str:
    r = report["results"]
    out = [
        "### Non-streaming latency (ms), direct vs through the gateway",
        "",
        "| concurrency | requests | direct p50 / p90 / p99 | proxied p50 / p90 / p99 "
        "| added p50 / p90 / p99 | ratio p50 | direct rps | proxied rps "
        "| gateway CPU ms/request |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for lvl in r["latency"]:
        added = lvl["added_ms"]
        out.append(
            f"| {lvl['concurrency']} | {lvl['proxied']['count']} | {_triple(lvl['direct'])} "
            f"| {_triple(lvl['proxied'])} "
            f"| {added['p50']:+.2f} / {added['p90']:+.2f} / {added['p99']:+.2f} "
            f"| {lvl['ratio']['p50']:.1f}x | {lvl['direct']['rps']:.0f} "
            f"| {lvl['proxied']['rps']:.0f} | {_num(lvl.get('gateway_cpu_ms_per_request'))} |"
        )

    t = r["ttft"]
    delay = t["token_delay_ms"]
    out += [
        "",
        "### Streaming time to first token (ms), concurrency 1, upstream token delay "
        + (f"{delay:g} ms" if delay is not None else "not scripted"),
        "",
        "| | direct | proxied | added |",
        "|---|---:|---:|---:|",
    ]
    for q in ("p50", "p90", "p99"):
        out.append(
            f"| TTFT {q} | {t['direct'][q]:.2f} | {t['proxied'][q]:.2f} | {t['added_ms'][q]:+.2f} |"
        )

    tp = r["throughput"]
    workers = report["setup"].get("web_workers")
    out += [
        "",
        f"### Maximum throughput, {tp['seconds']:g} s window per side, "
        + (f"{workers} gateway web worker(s)" if workers else "the gateway"),
        "",
        "| concurrency | | rps | p50 ms | p99 ms | " + CPU_COLUMNS,
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for lvl in tp.get("levels") or [tp]:
        for side in ("direct", "proxied"):
            out.append(f"| {lvl['concurrency']} | {side} " + _window_row(lvl[side], side))
    if tp.get("proxied_rps_ratio") is not None:
        low = tp["levels"][0]
        out += [
            "",
            f"Proxied throughput at {tp['concurrency']} in flight is "
            f"{tp['proxied_rps_ratio'] * 100:.1f}% of that at {low['concurrency']}.",
        ]
    other = tp["proxied"].get("other_cpu_percent")
    if other is not None:
        out += [
            "",
            f"Other programs used {other:.0f}% of a core during the proxied window at "
            f"{tp['concurrency']} ({_num(r.get('other_cpu_percent'), '.0f', '%')} over the "
            "whole run).",
        ]

    if "calibration" in r:
        out += [
            "",
            "### Load generator calibration: direct calls, raw asyncio client vs httpx",
            "",
            "| client | concurrency | rps | p50 ms | p99 ms | load generator CPU |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for client, by_level in r["calibration"].items():
            for level, s in by_level.items():
                c = level.removeprefix("concurrency_")
                out.append(
                    f"| {client} | {c} | {s['rps']:.0f} | {s['p50']:.2f} | {s['p99']:.2f} "
                    f"| {_num(s['cpu_percent'].get('loadgen'), '.0f', '%')} |"
                )

    if r.get("rss"):
        m = r["rss"]
        out += [
            "",
            f"### Memory: web worker RSS (VmRSS), proxied calls at concurrency {m['concurrency']}",
            "",
            "| proxied calls in this phase | seconds | RSS MiB | by process (pid: MiB) |",
            "|---:|---:|---:|---|",
        ]
        for pt in m["points"]:
            each = ", ".join(
                f"{e['pid']}: {_num(e['rss_mib'], '.1f')}" for e in pt["rss_mib_by_process"]
            )
            out.append(
                f"| {pt['requests']:,} | {pt['seconds']:.0f} | {_num(pt['rss_mib'], '.1f')} "
                f"| {each} |"
            )
        out += [
            "",
            f"Growth from the first point to the last: {_num(m['growth_percent'], '+.1f', '%')}; "
            f"{_num(m['rps'], '.0f')} rps, gateway CPU "
            f"{_num(m['gateway_cpu_ms_per_request'])} ms/request over the phase.",
        ]

    if r.get("workers"):
        w = r["workers"]
        pinning = report["setup"]["pinning"]
        out += [
            "",
            f"### Maximum throughput by web workers, concurrency {w['concurrency']}, "
            f"{w['seconds']:g} s window, the gateway started again for each",
            "",
            "| web workers | rps | p50 ms | p99 ms | " + CPU_COLUMNS,
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in w["by_workers"]:
            out.append(f"| {row['workers']} " + _window_row(row, "proxied"))
        first, last = w["by_workers"][0], w["by_workers"][-1]
        out += [
            "",
            f"{last['workers']} worker(s) / {first['workers']}: "
            f"{_num(w['rps_ratio'], '.2f', 'x')} the throughput. Gateway web CPU sums all its "
            "web processes (100% = one core). Pinning: "
            + (pinning.get("note") or f"gateway on core {pinning['gateway_cpu']}")
            + ".",
        ]

    out += [
        "",
        "### Targets (issue #15) for one worker",
        "",
        "| target | spec | measured | met | best-known Python gateway | Portkey (Node), one core |",
        "|---|---|---:|---|---|---|",
    ]
    for tgt in report["targets"]:
        fmt = {"rps": ".0f", "%": ".1f"}.get(tgt["unit"], ".2f")
        if tgt["key"] == "rss":
            fmt = "+.1f"  # a growth: which way it went matters
        unit = tgt["unit"] if tgt["unit"] == "%" else f" {tgt['unit']}"
        shown = _num(tgt["measured"], fmt, unit) if tgt["measured"] is not None else "not measured"
        if tgt.get("detail"):
            shown += f" ({tgt['detail']})"
        met = "yes" if tgt["met"] else "**no**"
        out.append(
            f"| {tgt['name']} | {tgt['target']} | {shown} | {met} "
            f"| {tgt['reference'] or '—'} | {tgt.get('portkey') or '—'} |"
        )
    return "\n".join(out)


CPU_COLUMNS = (
    "gateway web CPU | gateway helpers CPU | upstream CPU | load generator CPU "
    "| gateway CPU ms/request |"
)


def _window_row(s: dict[str, Any], side: str) -> str:
    """A max-throughput window's cells after its first: rps, latency, each process's CPU."""
    cpu = s["cpu_percent"]
    return (
        f"| {s['rps']:.0f} | {s['p50']:.2f} | {s['p99']:.2f} "
        + "".join(
            f"| {_num(cpu.get(g), '.0f', '%')} "
            for g in ("gateway", "gateway_helpers", "upstream", "loadgen")
        )
        + f"| {_num(s.get('gateway_cpu_ms_per_request')) if side == 'proxied' else ''} |"
    )


def output_path(requested: str | None, *, quick: bool) -> Path:
    if requested:
        return Path(requested)
    stem = f"proxy_overhead-{dt.date.today().isoformat()}" + ("-quick" if quick else "")
    path = RESULTS_DIR / f"{stem}.json"
    n = 2
    while path.exists() and not quick:  # keep earlier full runs of the same day
        path = RESULTS_DIR / f"{stem}-{n}.json"
        n += 1
    return path


def write_json(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(report), indent=2, allow_nan=False) + "\n")


def _finite(value: Any) -> Any:
    """NaN (an empty sample) is not JSON: write null instead."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
