"""What the repeated-run benchmarks (limits_overhead, translation_overhead) share: their command
line, the runs on fresh servers, and where the results go."""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from report import RESULTS_DIR, write_json
from servers import ServerError


def campaign_arguments(p: argparse.ArgumentParser, *, requests_help: str) -> None:
    p.add_argument("--quick", action="store_true", help="small samples, one run: a smoke run")
    p.add_argument("--runs", type=int, help="runs, each on fresh servers (default 3; quick: 1)")
    p.add_argument("--requests", type=int, help=f"{requests_help} (default 3000)")
    p.add_argument("--concurrency", default=None, help="levels, e.g. 1,16 (default; quick: 1)")
    p.add_argument("--no-pin", action="store_true", help="do not pin the processes to cores")
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="S",
        help="before each run, wait up to S seconds for other programs to leave the CPUs alone",
    )
    p.add_argument("--output", help="JSON path (default: bench/results/…)")


def campaign_defaults(args: argparse.Namespace) -> int:
    """Fill in what --quick changes; the number of runs wanted."""
    args.requests = args.requests or (100 if args.quick else 3000)
    args.levels = tuple(
        int(c) for c in (args.concurrency or ("1" if args.quick else "1,16")).split(",")
    )
    return int(args.runs or (1 if args.quick else 3))


def campaign_runs(
    wanted: int, args: argparse.Namespace, one_run: Callable[[int], dict[str, Any]]
) -> list[dict[str, Any]] | None:
    """`wanted` runs, each after the machine went quiet if asked; None (and the reason on
    stderr) when a server failed: such a run has no numbers to report."""
    runs = []
    try:
        for i in range(wanted):
            if args.wait_quiet > 0:
                from proxy_overhead import wait_for_quiet_machine

                wait_for_quiet_machine(args.wait_quiet)
            runs.append(one_run(i))
    except ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
    return runs


def campaign_write(name: str, report: dict[str, Any], args: argparse.Namespace, text: str) -> None:
    suffix = "-quick" if args.quick else ""
    stem = f"{name}-{dt.date.today().isoformat()}{suffix}"
    path = Path(args.output) if args.output else RESULTS_DIR / f"{stem}.json"
    write_json(report, path)
    print()
    print(text)
    print(f"\nresults: {path}")


def verdict(
    what: str, figures: list[float], target: float, *, unit: str = "ms", at: str = " at p50"
) -> str:
    """One line: the spread of a figure over the runs, and whether its target holds in all.
    `unit` and `at` say what the figure is (a throughput loss is "%", not "ms at p50")."""
    worst = max(figures)
    held = "holds" if worst <= target else "MISSED"
    return (
        f"{what} {min(figures):+.3f} … {worst:+.3f} {unit}{at} over {len(figures)} run(s);"
        f" target ≤ {target} {unit}: {held}"
    )
