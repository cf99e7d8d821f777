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

# The spec's targets for one gateway worker, and the reference point they were set against:
# the best-known Python gateway measured on a similar 2-core machine.
TARGET_ADDED_P50_MS = 3.0  # at concurrency 1
TARGET_RPS = 300.0  # one worker, one core
TARGET_ADDED_TTFT_MS = 2.0
REFERENCE = {"added_p50_ms": "~17 ms", "rps": "60-70 rps", "added_ttft_ms": "~20 ms"}


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


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    c1 = next((lvl for lvl in results["latency"] if lvl["concurrency"] == 1), None)
    added_p50 = c1["added_ms"]["p50"] if c1 else None
    rps = results["throughput"]["proxied"]["rps"]
    added_ttft = results["ttft"]["added_ms"]["p50"]
    return [
        {
            "name": "added latency p50, concurrency 1",
            "target": f"<= {TARGET_ADDED_P50_MS:g} ms",
            "measured": added_p50,
            "unit": "ms",
            "met": added_p50 is not None and added_p50 <= TARGET_ADDED_P50_MS,
            "reference": REFERENCE["added_p50_ms"],
        },
        {
            "name": "throughput, one worker on one core",
            "target": f"> {TARGET_RPS:g} rps",
            "measured": rps,
            "unit": "rps",
            "met": rps > TARGET_RPS,
            "reference": REFERENCE["rps"],
        },
        {
            "name": "added TTFT p50, concurrency 1",
            "target": f"< {TARGET_ADDED_TTFT_MS:g} ms",
            "measured": added_ttft,
            "unit": "ms",
            "met": added_ttft < TARGET_ADDED_TTFT_MS,
            "reference": REFERENCE["added_ttft_ms"],
        },
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
    out += [
        "",
        f"### Maximum throughput, concurrency {tp['concurrency']}, "
        f"{tp['seconds']:g} s window, one gateway worker",
        "",
        "| | rps | p50 ms | p99 ms | gateway web CPU | gateway helpers CPU | upstream CPU "
        "| load generator CPU | gateway CPU ms/request |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for side in ("direct", "proxied"):
        s = tp[side]
        cpu = s["cpu_percent"]
        out.append(
            f"| {side} | {s['rps']:.0f} | {s['p50']:.2f} | {s['p99']:.2f} "
            + "".join(
                f"| {_num(cpu.get(g), '.0f', '%')} "
                for g in ("gateway", "gateway_helpers", "upstream", "loadgen")
            )
            + f"| {_num(s.get('gateway_cpu_ms_per_request')) if side == 'proxied' else ''} |"
        )
    other = tp["proxied"].get("other_cpu_percent")
    if other is not None:
        out += [
            "",
            f"Other programs used {other:.0f}% of a core during the proxied window "
            f"({_num(r.get('other_cpu_percent'), '.0f', '%')} over the whole run).",
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

    out += [
        "",
        "### Targets (spec) for one worker",
        "",
        "| target | spec | measured | met | best-known Python gateway |",
        "|---|---|---:|---|---|",
    ]
    for tgt in report["targets"]:
        fmt = ".0f" if tgt["unit"] == "rps" else ".2f"
        shown = _num(tgt["measured"], fmt, f" {tgt['unit']}")
        met = "yes" if tgt["met"] else "**no**"
        out.append(f"| {tgt['name']} | {tgt['target']} | {shown} | {met} | {tgt['reference']} |")
    return "\n".join(out)


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
