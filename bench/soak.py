"""The soak (issue #16): mixed traffic on one gateway worker for a long time, and proof that
nothing it holds grows.

One fake upstream (`python -m fake_upstream`) and one gateway as a user runs it
(`manage.py serve`: one uvicorn web worker, its Celery worker and beat; embedded: SQLite, key
state in process, call recording on), both started here in a temporary data directory. Two
providers on the fake, `oai` (OpenAI wire format, two keys) and `ant` (Anthropic, two keys), and
two routes that fail over to each other: `soak-chat` (oai, then ant, translated) and
`soak-claude` (ant, then oai). For the whole run:

- clients on the official SDKs at a steady rate (`--rate`, `--concurrency` callers): OpenAI chat
  completions JSON and streamed, Anthropic messages JSON and streamed, in turn;
- faults: every few seconds one key of each provider is given a 429, a 500 or a 529 for its next
  call (`POST /_fake/script`), so that keys rotate and routes fail over all along;
- probes: beat dispatches the endpoint's ping and HTTP probes every few seconds (intervals
  shortened through the settings of docs/configuration.md), and the worker sends them;
- a staff user, logged in through the admin's login form, polls every dashboard panel (the
  htmx fragments), the monitoring API's /api/usage endpoints and /metrics.

Every `--interval` seconds it samples the web worker: RSS (VmRSS), open file descriptors,
threads, its ESTABLISHED connections to the fake upstream (the proxy's pool: /proc/PID/net/tcp
matched to the sockets among /proc/PID/fd), the recorder's queue (`llmrotate_recorder_queue_depth`
from /metrics) and the record lag (upstream attempts the fake counted minus call records the
recorder wrote). After the warm-up (WARMUP_FRACTION of the run, at least WARMUP_MIN_SECONDS) each
series gets a least-squares line; its growth over the measured window (slope x window) and its
spread (max - min) must stay within TOLERANCES. When the traffic stops, the recorder's queue
must drain to 0, and once the gateway has stopped (flushing its records) the database must
hold one call record per upstream attempt the fake counted. Every client call must succeed:
failover hides the scripted faults.

    .venv/bin/python bench/soak.py                    # 30 minutes (make soak)
    .venv/bin/python bench/soak.py --duration 180 --check   # what CI runs

Progress: one line per sample. Results: bench/results/soak-<date>.json (the samples, each
metric's verdict, traffic and record counts, machine and commit); --check exits 1 when a
series is not flat or a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import itertools
import math
import os
import re
import secrets
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script from anywhere

import servers
from report import machine_info, write_json
from servers import ServerError, Stack, rss_bytes

# CI runs the soak beside the other test leg on a 2-core machine, where migrating a fresh
# SQLite database has taken over the benchmarks' 60 s.
servers.STARTUP_TIMEOUT_SECONDS = STARTUP_TIMEOUT_SECONDS = 180.0

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_DURATION = 1800.0
DEFAULT_INTERVAL = 10.0
# The first part of a run is warm-up (imports, caches, pools and SQLite's page cache filling):
# a fifth of it, and never less than this.
WARMUP_FRACTION = 0.2
WARMUP_MIN_SECONDS = 30.0
# A line needs a few points to say anything.
MIN_MEASURED_SAMPLES = 5
# The recorder's queue must drain to 0 within this after the traffic stops.
DRAIN_TIMEOUT_SECONDS = 30.0
# How often the fault scripter tops up each key's queue, and the dashboard poller polls.
FAULT_EVERY_SECONDS = 3.0
POLL_EVERY_SECONDS = 5.0
# Probe timing for the gateway (settings, docs/configuration.md "Endpoint health checks"):
# beat looks every 2 s, each endpoint is pinged and HTTP-probed every 10 s.
PROBE_ENV = {
    "LLMROTATE_PROBE_TICK_SECONDS": "2",
    "LLMROTATE_PING_INTERVAL_SECONDS": "10",
    "LLMROTATE_HTTP_PROBE_INTERVAL_SECONDS": "10",
}
CHAT_MODEL = "gpt-4o-mini"
CLAUDE_MODEL = "claude-3-5-haiku-latest"
KEYS = {
    "oai-1": "sk-soak-oai-000000000001",
    "oai-2": "sk-soak-oai-000000000002",
    "ant-1": "sk-ant-soak-000000000001",
    "ant-2": "sk-ant-soak-000000000002",
}
# Faults per key, topped up whenever the last was consumed. A call that meets both oai keys
# failing fails over to the ant deployment; ant-2 always answers, so every client call can
# succeed (LLMROTATE_MAX_ATTEMPTS is 5).
FAULTS = {
    KEYS["oai-1"]: [{"fault": "429", "retry_after": 1}, {"fault": "500"}],
    KEYS["oai-2"]: [{"fault": "503"}],
    KEYS["ant-1"]: [{"fault": "529"}],
}
# Formatted by Stack.configure_gateway (only {upstream} is a placeholder of ours). Block style,
# so that the only braces are placeholders.
SOAK_CONFIG = f"""\
providers:
  oai:
    kind: openai
    base_url: "{{upstream}}"
  ant:
    kind: anthropic
    base_url: "{{upstream}}"
keys:
  - id: oai-1
    provider: oai
    secret: "literal://{KEYS["oai-1"]}"
  - id: oai-2
    provider: oai
    secret: "literal://{KEYS["oai-2"]}"
  - id: ant-1
    provider: ant
    secret: "literal://{KEYS["ant-1"]}"
  - id: ant-2
    provider: ant
    secret: "literal://{KEYS["ant-2"]}"
routes:
  soak-chat:
    deployments:
      - provider: oai
        model: "{CHAT_MODEL}"
      - provider: ant
        model: "{CLAUDE_MODEL}"
  soak-claude:
    deployments:
      - provider: ant
        model: "{CLAUDE_MODEL}"
      - provider: oai
        model: "{CHAT_MODEL}"
clients:
  - name: bench
    routes: ["*"]
    scopes: [proxy]
"""
UPSTREAM_SCRIPT = {
    "default": {"latency_ms": 5, "token_delay_ms": 2, "completion_tokens": 12},
}
# The upstream paths whose every attempt the gateway records.
PROXIED_PATHS = ("/v1/chat/completions", "/v1/messages")
DASHBOARD_PANELS = (
    "providers",
    "summary",
    "timeseries",
    "models",
    "recent",
    "reconciliation",
    "key_table",
    "key_details",
    "endpoints",
    "calls",
    "clients",
    "limits",
    "experiments",
)
API_PATHS = (
    "/api/usage?window=1h",
    "/api/usage/models?window=1h",
    "/api/usage/timeseries?window=1h",
    "/api/usage/stats?window=1h",
    "/api/usage/recent",
)
KINDS = ("openai-json", "openai-stream", "anthropic-json", "anthropic-stream")
MIB = 1024 * 1024


@dataclass(frozen=True)
class Tolerance:
    """How much a series may move over the measured window: its least-squares growth (slope x
    window) at most `growth`, and at most `growth_fraction` of the fitted start value when set;
    its spread (max - min) at most `spread` when set; its last sample at most `last` when set."""

    growth: float
    growth_fraction: float | None = None
    spread: float | None = None
    last: float | None = None
    unit: str = ""


# RSS: the allocator keeps what it got, so a little growth after warm-up is normal; a leak of
# even 1 KiB per request grows it by tens of MiB in 30 minutes at 20 requests/s. File
# descriptors and pool connections move with the calls in flight (--concurrency), not with time.
TOLERANCES = {
    "rss_mib": Tolerance(growth=20.0, growth_fraction=0.05, unit="MiB"),
    "fds": Tolerance(growth=4.0, spread=40.0),
    "threads": Tolerance(growth=2.0, spread=12.0),
    "pool_connections": Tolerance(growth=2.0, spread=16.0),
    "recorder_queue": Tolerance(growth=10.0, last=50.0),
    "record_lag": Tolerance(growth=50.0),
}


def least_squares(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """(slope, intercept) of the least-squares line through the points."""
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    var = sum((x - mean_x) ** 2 for x in xs)
    if var == 0:
        return 0.0, mean_y
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / var
    return slope, mean_y - slope * mean_x


def warmup_seconds(duration: float) -> float:
    return max(WARMUP_MIN_SECONDS, WARMUP_FRACTION * duration)


def flatness(
    times: Sequence[float], values: Sequence[float | None], *, warmup: float, tol: Tolerance
) -> dict[str, Any]:
    """The verdict on one series: samples before `warmup` seconds are left out, a line is
    fitted through the rest, and its growth over the window and the spread are held against
    `tol`. `ok` is False with the reasons in `failures`; a series without enough samples after
    the warm-up is not flat (nothing was shown)."""
    points = [(t, v) for t, v in zip(times, values, strict=True) if t >= warmup and v is not None]
    out: dict[str, Any] = {"samples": len(points), "tolerance": asdict(tol)}
    if len(points) < MIN_MEASURED_SAMPLES:
        out.update(ok=False, failures=[f"{len(points)} samples after the warm-up"])
        return out
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    slope, intercept = least_squares(xs, ys)
    window = xs[-1] - xs[0]
    growth = slope * window
    start = intercept + slope * xs[0]
    out.update(
        window_seconds=window,
        slope_per_hour=slope * 3600,
        growth=growth,
        start=start,
        first=ys[0],
        last=ys[-1],
        min=min(ys),
        max=max(ys),
        spread=max(ys) - min(ys),
    )
    failures = []
    if growth > tol.growth:
        failures.append(f"grew {growth:.2f}{tol.unit} over {window:.0f} s (> {tol.growth:g})")
    if tol.growth_fraction is not None and start > 0 and growth > tol.growth_fraction * start:
        failures.append(
            f"grew {growth / start:.1%} of {start:.1f}{tol.unit} (> {tol.growth_fraction:.0%})"
        )
    if tol.spread is not None and max(ys) - min(ys) > tol.spread:
        failures.append(f"spread {max(ys) - min(ys):g} (> {tol.spread:g})")
    if tol.last is not None and ys[-1] > tol.last:
        failures.append(f"last sample {ys[-1]:g} (> {tol.last:g})")
    out.update(ok=not failures, failures=failures)
    return out


# --- sampling the web worker ---------------------------------------------------------------


def open_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def thread_count(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return None


def socket_inodes(pid: int) -> set[str]:
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    return inodes


def connections_to(pid: int, port: int) -> int | None:
    """ESTABLISHED TCP connections of `pid` to `port` (any local address): the sockets in the
    network namespace's tables whose inode is one of the process's descriptors."""
    inodes = socket_inodes(pid)
    count = 0
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            if table == "tcp":
                return None
            continue
        for line in lines:
            fields = line.split()
            # sl local rem st queues timer retransmits uid timeout inode (proc(5))
            if fields[3] == "01" and int(fields[2].rsplit(":", 1)[1], 16) == port:
                count += fields[9] in inodes
    return count


_SAMPLE_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


def metric_sums(text: str) -> dict[str, float]:
    """Each series name of a Prometheus text exposition, summed over its labels."""
    sums: dict[str, float] = {}
    for line in text.splitlines():
        match = _SAMPLE_LINE.match(line)
        if match:
            with contextlib.suppress(ValueError):
                sums[match.group(1)] = sums.get(match.group(1), 0.0) + float(match.group(3))
    return sums


# --- the traffic ---------------------------------------------------------------------------


@dataclass
class Tally:
    ok: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    errors: dict[str, int] = field(default_factory=dict)
    error_examples: list[str] = field(default_factory=list)
    polls_ok: int = 0
    faults_scripted: int = 0

    def error(self, what: str, exc: BaseException | str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1
        if len(self.error_examples) < 10:
            text = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
            self.error_examples.append(f"{what}: {text[:300]}")

    @property
    def calls(self) -> int:
        return sum(self.ok.values())

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


async def one_call(kind: str, oai: Any, ant: Any, n: int) -> None:
    """One client call of `kind` through the SDKs; raises unless an answer with text came."""
    prompt = [{"role": "user", "content": f"soak call {n}: say something short"}]
    if kind == "openai-json":
        reply = await oai.chat.completions.create(model="soak-chat", messages=prompt, max_tokens=32)
        text = reply.choices[0].message.content
    elif kind == "openai-stream":
        stream = await oai.chat.completions.create(
            model="soak-chat",
            messages=prompt,
            max_tokens=32,
            stream=True,
            stream_options={"include_usage": True},
        )
        parts = []
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
        text = "".join(parts)
    elif kind == "anthropic-json":
        message = await ant.messages.create(model="soak-claude", max_tokens=32, messages=prompt)
        text = "".join(block.text for block in message.content if block.type == "text")
    else:
        async with ant.messages.stream(
            model="soak-claude", max_tokens=32, messages=prompt
        ) as stream:
            text = "".join([piece async for piece in stream.text_stream])
    if not text:
        raise ServerError(f"{kind}: an answer without text")


async def caller(
    i: int, stack: Stack, tally: Tally, stop: asyncio.Event, *, rate: float, concurrency: int
) -> None:
    # The SDKs' own retries would hide a failed call: the gateway's failover must do it.
    oai = openai.AsyncOpenAI(
        base_url=stack.gateway_url, api_key=stack.token, max_retries=0, timeout=30
    )
    ant = anthropic.AsyncAnthropic(
        base_url=stack.gateway_url.removesuffix("/v1"),
        api_key=stack.token,
        max_retries=0,
        timeout=30,
    )
    period = concurrency / rate
    due = time.monotonic() + i * period / concurrency  # callers spread over the period
    try:
        for n in itertools.count():
            await _sleep_until(due, stop)
            if stop.is_set():
                return
            kind = KINDS[(n + i) % len(KINDS)]
            try:
                await one_call(kind, oai, ant, n)
            except Exception as exc:
                tally.error(kind, exc)
            else:
                tally.ok[kind] += 1
            due = max(due + period, time.monotonic() - period)  # late: catch up one, not all
    finally:
        await oai.close()
        await ant.close()


async def _sleep_until(deadline: float, stop: asyncio.Event) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), max(0.0, deadline - time.monotonic()))


async def fault_scripter(upstream: httpx.AsyncClient, tally: Tally, stop: asyncio.Event) -> None:
    """Give each faulty key its next fault once it has consumed the last."""
    while not stop.is_set():
        try:
            queued = (await upstream.get("/_fake/stats")).json()["queued"]
            spec = {
                key: {"queue": faults}
                for key, faults in FAULTS.items()
                if not queued.get(key)  # consumed: top up
            }
            if spec:
                (await upstream.post("/_fake/script", json={"keys": spec})).raise_for_status()
                tally.faults_scripted += sum(len(f) for f in spec.values())
        except httpx.HTTPError as exc:
            tally.error("fault-script", exc)
        await _sleep_until(time.monotonic() + FAULT_EVERY_SECONDS, stop)


async def staff_login(base: str, username: str, password: str) -> httpx.AsyncClient:
    """A client holding a staff session, logged in through the admin's login form."""
    client = httpx.AsyncClient(base_url=base, trust_env=False, timeout=30)
    page = await client.get("/admin/login/")
    match = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
    if page.status_code != 200 or not match:
        raise ServerError(f"admin login page: HTTP {page.status_code}")
    answer = await client.post(
        "/admin/login/?next=/dashboard/",
        data={
            "username": username,
            "password": password,
            "csrfmiddlewaretoken": match.group(1),
            "next": "/dashboard/",
        },
        headers={"Referer": f"{base}/admin/login/"},
    )
    if answer.status_code != 302 or "sessionid" not in client.cookies:
        raise ServerError(f"admin login failed: HTTP {answer.status_code}")
    return client


async def dashboard_poller(staff: httpx.AsyncClient, tally: Tally, stop: asyncio.Event) -> None:
    """Every panel's htmx fragment and the monitoring API, as an open dashboard polls them."""
    urls = [f"/dashboard/panels/{name}/" for name in DASHBOARD_PANELS] + list(API_PATHS)
    headers = {"HX-Request": "true", "HX-Current-URL": "/dashboard/"}
    while not stop.is_set():
        due = time.monotonic() + POLL_EVERY_SECONDS
        for url in urls:
            try:
                answer = await staff.get(url, headers=headers)
            except httpx.HTTPError as exc:
                tally.error("dashboard", exc)
                continue
            if answer.status_code == 200 and "hx-redirect" not in answer.headers:
                tally.polls_ok += 1
            elif answer.status_code == 200:  # the session is gone: sent to the login page
                tally.error("dashboard", f"{url}: logged out")
            else:
                tally.error("dashboard", f"{url}: HTTP {answer.status_code}")
        await _sleep_until(due, stop)


# --- the run -------------------------------------------------------------------------------


@dataclass
class Probe:
    """What a sample reads besides /proc: /metrics (as staff) and the fake's counters."""

    staff: httpx.AsyncClient
    upstream: httpx.AsyncClient

    async def metrics(self) -> dict[str, float]:
        answer = await self.staff.get("/metrics")
        answer.raise_for_status()
        return metric_sums(answer.text)

    async def attempts(self) -> tuple[int, dict[str, Any]]:
        stats = (await self.upstream.get("/_fake/stats")).json()
        return sum(stats["paths"].get(p, 0) for p in PROXIED_PATHS), stats


async def take_sample(
    t: float, stack: Stack, probe: Probe, tally: Tally, upstream_port: int
) -> dict[str, Any]:
    pid = stack.gateway_pid
    assert pid is not None
    rss = rss_bytes(pid)
    sample: dict[str, Any] = {
        "t": round(t, 1),
        "rss_mib": rss / MIB if rss is not None else None,
        "fds": open_fds(pid),
        "threads": thread_count(pid),
        "pool_connections": connections_to(pid, upstream_port),
        "recorder_queue": None,
        "record_lag": None,
        "calls_ok": tally.calls,
        "errors": tally.error_count,
    }
    try:
        attempts, _ = await probe.attempts()
        sums = await probe.metrics()
    except (httpx.HTTPError, ValueError) as exc:
        tally.error("sample", exc)
        return sample
    sample["recorder_queue"] = sums.get("llmrotate_recorder_queue_depth")
    written = sums.get("llmrotate_recorder_records_written_total")
    if written is not None:
        sample["record_lag"] = attempts - written
    sample["upstream_attempts"] = attempts
    return sample


def progress(sample: dict[str, Any], rps: float) -> str:
    def num(value: Any, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    return (
        f"  t={sample['t']:>6.0f}s  rss {num(sample['rss_mib'], '.1f')} MiB"
        f"  fds {num(sample['fds'], 'd')}  threads {num(sample['threads'], 'd')}"
        f"  pool {num(sample['pool_connections'], 'd')}"
        f"  queue {num(sample['recorder_queue'], '.0f')}  lag {num(sample['record_lag'], '.0f')}"
        f"  calls {sample['calls_ok']} ({rps:.1f}/s)  errors {sample['errors']}"
    )


async def drive(stack: Stack, args: argparse.Namespace, password: str) -> dict[str, Any]:
    upstream_root = stack.upstream_url.removesuffix("/").removesuffix("/v1")
    upstream_port = int(upstream_root.rsplit(":", 1)[1])
    gateway_root = stack.gateway_url.removesuffix("/v1")
    tally = Tally()
    stop = asyncio.Event()
    samples: list[dict[str, Any]] = []
    async with httpx.AsyncClient(base_url=upstream_root, trust_env=False, timeout=10) as upstream:
        (await upstream.post("/_fake/script", json=UPSTREAM_SCRIPT)).raise_for_status()
        staff = await staff_login(gateway_root, args.admin_username, password)
        poller_session = await staff_login(gateway_root, args.admin_username, password)
        probe = Probe(staff=staff, upstream=upstream)
        tasks = [
            asyncio.create_task(
                caller(i, stack, tally, stop, rate=args.rate, concurrency=args.concurrency)
            )
            for i in range(args.concurrency)
        ]
        tasks.append(asyncio.create_task(fault_scripter(upstream, tally, stop)))
        tasks.append(asyncio.create_task(dashboard_poller(poller_session, tally, stop)))
        start = time.monotonic()
        try:
            for k in itertools.count(1):
                due = start + k * args.interval
                if due > start + args.duration + 1e-6:
                    break
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                for task in tasks:
                    if task.done() and task.exception() is not None:
                        raise task.exception()  # type: ignore[misc]
                stack.children[-1].check_alive()
                elapsed = time.monotonic() - start
                sample = await take_sample(elapsed, stack, probe, tally, upstream_port)
                samples.append(sample)
                print(progress(sample, tally.calls / elapsed), flush=True)
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
        traffic_seconds = time.monotonic() - start
        drained = await drain(probe)
        attempts, stats = await probe.attempts()
        final_metrics = await probe.metrics()
        await staff.aclose()
        await poller_session.aclose()
    return {
        "samples": samples,
        "tally": tally,
        "traffic_seconds": traffic_seconds,
        "drain": drained,
        "upstream_attempts": attempts,
        "upstream_paths": stats["paths"],
        "faults_left_queued": sum(stats["queued"].values()),
        "rotations": final_metrics.get("llmrotate_key_rotations_total", 0.0),
        "failovers": final_metrics.get("llmrotate_failovers_total", 0.0),
        "records_written_metric": final_metrics.get("llmrotate_recorder_records_written_total"),
    }


async def drain(probe: Probe) -> dict[str, Any]:
    """Wait (up to DRAIN_TIMEOUT_SECONDS) until the recorder's queue is empty and it has written
    a record for every attempt the fake counted."""
    start = time.monotonic()
    queue = written = attempts = None
    while time.monotonic() - start < DRAIN_TIMEOUT_SECONDS:
        attempts, _ = await probe.attempts()
        sums = await probe.metrics()
        queue = sums.get("llmrotate_recorder_queue_depth")
        written = sums.get("llmrotate_recorder_records_written_total")
        if queue == 0 and written == attempts:
            break
        await asyncio.sleep(0.5)
    return {
        "ok": queue == 0 and written == attempts,
        "seconds": time.monotonic() - start,
        "recorder_queue": queue,
        "records_written": written,
        "upstream_attempts": attempts,
    }


def verdicts(samples: list[dict[str, Any]], duration: float) -> dict[str, dict[str, Any]]:
    warmup = warmup_seconds(duration)
    times = [s["t"] for s in samples]
    return {
        name: flatness(times, [s.get(name) for s in samples], warmup=warmup, tol=tol)
        for name, tol in TOLERANCES.items()
    }


def checks(run: dict[str, Any], records: int | None) -> dict[str, dict[str, Any]]:
    """What must hold besides flatness, each with what was seen."""
    tally: Tally = run["tally"]
    paths = run["upstream_paths"]
    return {
        "every_call_succeeded": {
            "ok": tally.calls > 0 and tally.error_count == 0,
            "calls": tally.calls,
            "errors": tally.errors,
        },
        "faults_caused_rotation_or_failover": {
            "ok": run["rotations"] + run["failovers"] > 0,
            "rotations": run["rotations"],
            "failovers": run["failovers"],
            "faults_scripted": tally.faults_scripted,
        },
        "probes_ran": {
            "ok": paths.get("/v1/models", 0) > 0,
            "upstream_models_calls": paths.get("/v1/models", 0),
        },
        "dashboard_polled": {"ok": tally.polls_ok > 0, "polls": tally.polls_ok},
        "recorder_drained": run["drain"],
        "one_record_per_attempt": {
            "ok": records is not None and records == run["upstream_attempts"],
            "call_records": records,
            "upstream_attempts": run["upstream_attempts"],
        },
    }


def output_path(requested: str | None, duration: float) -> Path:
    if requested:
        return Path(requested)
    suffix = "" if duration == DEFAULT_DURATION else f"-{duration:.0f}s"
    stem = f"soak-{dt.date.today().isoformat()}{suffix}"
    path = RESULTS_DIR / f"{stem}.json"
    n = 2
    while path.exists():  # keep earlier runs of the same day
        path = RESULTS_DIR / f"{stem}-{n}.json"
        n += 1
    return path


def summary(report: dict[str, Any]) -> str:
    lines = [
        "",
        "| series | first | last | growth (fit) | spread | limit | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, v in report["flatness"].items():
        if "growth" not in v:
            lines.append(f"| {name} | - | - | - | - | - | NOT FLAT: {'; '.join(v['failures'])} |")
            continue
        tol = v["tolerance"]
        limit = f"growth <= {tol['growth']:g}"
        if tol["growth_fraction"] is not None:
            limit += f" and {tol['growth_fraction']:.0%}"
        if tol["spread"] is not None:
            limit += f", spread <= {tol['spread']:g}"
        if tol["last"] is not None:
            limit += f", last <= {tol['last']:g}"
        lines.append(
            f"| {name} | {v['first']:.1f} | {v['last']:.1f} | {v['growth']:+.2f} | "
            f"{v['spread']:.1f} | {limit} | "
            + ("flat" if v["ok"] else "NOT FLAT: " + "; ".join(v["failures"]))
            + " |"
        )
    lines.append("")
    for name, c in report["checks"].items():
        detail = ", ".join(f"{k}={c[k]}" for k in c if k != "ok")
        lines.append(f"- {name}: {'ok' if c['ok'] else 'FAILED'} ({detail})")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=DEFAULT_DURATION, help="seconds of traffic")
    p.add_argument("--interval", type=float, default=DEFAULT_INTERVAL, help="seconds per sample")
    p.add_argument("--rate", type=float, default=20.0, help="client calls per second in all")
    p.add_argument("--concurrency", type=int, default=4, help="SDK callers (calls in flight)")
    p.add_argument("--json", dest="output", help="where the JSON goes (default bench/results/)")
    p.add_argument("--check", action="store_true", help="exit 1 unless flat and every check holds")
    p.add_argument("--keep-data", action="store_true", help="keep the data dir (logs, SQLite)")
    p.add_argument("--serve-args", default="", help="extra arguments for manage.py serve")
    p.add_argument("--admin-username", default="soak", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.duration < 2 * WARMUP_MIN_SECONDS:
        p.error(f"--duration must be at least {2 * WARMUP_MIN_SECONDS:g} s (warm-up, then samples)")
    if args.interval <= 0 or args.rate <= 0 or args.concurrency < 1:
        p.error("--interval and --rate must be > 0, --concurrency >= 1")
    measured = math.floor((args.duration - warmup_seconds(args.duration)) / args.interval) + 1
    if measured < MIN_MEASURED_SAMPLES:
        p.error(
            f"--duration {args.duration:g} with --interval {args.interval:g} leaves {measured} "
            f"samples after the warm-up; the verdict needs {MIN_MEASURED_SAMPLES}"
        )
    return args


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Started in the background (make soak &, nohup), SIGINT arrives ignored: Ctrl-C and a
    # SIGTERM must both stop the servers by PID in the finally below, not leave it to
    # PR_SET_PDEATHSIG.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    password = secrets.token_urlsafe(16)
    stack = Stack.create(keep_data=args.keep_data)
    # `serve` creates this superuser on its first start (admin_ensure).
    stack.env.update(
        PROBE_ENV,
        LLMROTATE_ADMIN_USERNAME=args.admin_username,
        LLMROTATE_ADMIN_PASSWORD=password,
    )
    started = dt.datetime.now(dt.UTC)
    print(
        f"soak: {args.duration:g} s of mixed traffic at {args.rate:g} calls/s "
        f"({args.concurrency} callers), a sample every {args.interval:g} s, warm-up "
        f"{warmup_seconds(args.duration):g} s; data in {stack.data_dir}",
        flush=True,
    )
    try:
        t0 = time.monotonic()
        stack.start_upstream(cpu=None)
        stack.configure_gateway(stack.upstream_url, template=SOAK_CONFIG)
        stack.start_gateway(cpu=None, extra_args=args.serve_args.split())
        startup_seconds = time.monotonic() - t0
        print(
            f"  gateway {stack.gateway_url} (web worker pid {stack.gateway_pid}), "
            f"started in {startup_seconds:.0f} s",
            flush=True,
        )
        run = asyncio.run(drive(stack, args, password))
        t0 = time.monotonic()
        stack.stop_gateway()  # flushes what the recorder still holds
        stop_seconds = time.monotonic() - t0
        records = stack.records_written()
    except ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no result written", file=sys.stderr)
        return 130
    finally:
        stack.close()
    tally: Tally = run["tally"]
    report = {
        "benchmark": "soak",
        "started": started.isoformat(timespec="seconds"),
        "setup": {
            "duration_seconds": args.duration,
            "traffic_seconds": run["traffic_seconds"],
            "interval_seconds": args.interval,
            "warmup_seconds": warmup_seconds(args.duration),
            "startup_seconds": startup_seconds,
            "drain_seconds": run["drain"]["seconds"],
            "stop_seconds": stop_seconds,
            "rate": args.rate,
            "concurrency": args.concurrency,
            "mode": "embedded: SQLite, key state in process; one web worker, Celery worker, beat",
            "serve_args": args.serve_args,
        },
        "traffic": {
            "calls_ok": dict(tally.ok),
            "calls_per_second": tally.calls / run["traffic_seconds"],
            "errors": tally.errors,
            "error_examples": tally.error_examples,
            "dashboard_polls_ok": tally.polls_ok,
            "faults_scripted": tally.faults_scripted,
            "faults_unused": run["faults_left_queued"],
            "upstream_paths": run["upstream_paths"],
        },
        "flatness": verdicts(run["samples"], args.duration),
        "checks": checks(run, records),
        "samples": run["samples"],
        "machine": machine_info(len(os.sched_getaffinity(0))),
    }
    report["ok"] = all(v["ok"] for v in report["flatness"].values()) and all(
        c["ok"] for c in report["checks"].values()
    )
    path = output_path(args.output, args.duration)
    write_json(report, path)
    print(summary(report))
    print(f"\n{'flat' if report['ok'] else 'NOT FLAT or a check failed'}; results in {path}")
    return 1 if args.check and not report["ok"] else 0


if __name__ == "__main__":
    sys.exit(main())
