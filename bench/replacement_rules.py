"""What do model replacement rules cost on the hot path? Issue #12's target: with three rules on
the route, evaluating them costs under 0.05 ms at p50.

Two measurements in one run:

1. In process (the figure the target is about). `proxy.replacement.replacement_assign`, which
   evaluates a route's rules on the request path (a route without rules costs it a dictionary
   lookup), is timed on a routing snapshot built in memory (keys.routing dataclasses,
   keys.replacement.ReplacementSpec; no database) for many distinct request ids and sessions,
   turns 1 to 12, with a realistic chat body (system prompt, the turns so far, one message in
   content parts) and the headers Django hands the view. Route `chat` has three rules:

   - `ci-canary`: only for the client `ci-bot` (the benchmark's client is `app`): never
     eligible, so every request pays its condition check and moves on;
   - `sessions-to-mini`: per session from turn 3, probability 0.1, 5 sticky turns, only
     requests without tools and without images (the image check walks every message);
   - `requests-to-haiku`: per request, probability 0.1.

   Route `chat-plain` has none. Every request is timed on both routes, one after the other,
   with `time.perf_counter_ns` around each call (the order turned around every other request);
   the rule cost is p50 (p95, p99) with rules minus p50 (…) without, in microseconds. The
   timer's own cost (two back-to-back reads) is in both sides and is reported. A batched
   timing (one clock read around all the calls, divided by their number) checks the mean. The
   arms the rules assigned are counted: the share replaced must match the rules' draws (0.1 of
   `requests-to-haiku`'s requests, the geometric per-session share of `sessions-to-mini`'s).

2. Through the gateway, the harness of bench/capture_overhead.py: one fake upstream and one
   gateway (`manage.py serve --no-worker --no-beat`, SQLite, recording on) with two routes on
   the same deployment (fake/gpt-4o-mini): `rules-4o-mini`, with three rules like the above
   whose target is that same deployment (so a replaced request makes the same upstream call),
   and `plain-4o-mini`, with none. The calls carry a session header and two user turns, so
   `ci-canary` and the per-session rule (from turn 3) are checked and skipped and the
   per-request one draws. Three targets (direct, each route) in rotating blocks, JSON answers
   and streams, at concurrency 1: rules = added p50 of `rules-4o-mini` minus that of
   `plain-4o-mini`. Before measuring, the rules route must answer some call with
   `x-llmrotate-replacement` and the plain one never; after, the call records' arms are
   counted. Two routes of one process differ by a few hundredths of a millisecond even with no
   rules (docs/benchmarks.md), which is the size of the target: this part shows that no cost
   appears above that noise; part 1 is the measurement.

    .venv/bin/python bench/replacement_rules.py                  # both parts, 3 gateway runs
    .venv/bin/python bench/replacement_rules.py --in-process     # part 1 only
    .venv/bin/python bench/replacement_rules.py --quick          # smoke run
    .venv/bin/python bench/replacement_rules.py --no-rules       # calibration: no rules at all
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import sqlite3
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass
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
from loadgen import Target, percentile
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

# The bound on what three rules add, at p50.
TARGET_MS = 0.05
TARGET_US = TARGET_MS * 1000
CALLS = 200_000
QUICK_CALLS = 20_000
WARMUP_CALLS = 5_000
SESSIONS = 5_000
MAX_TURN = 12
QUANTILES = {"p50": 0.50, "p95": 0.95, "p99": 0.99}
# Above this much CPU used by other programs (% of one core) the run is flagged as skewed.
BUSY_MACHINE_PERCENT = 10.0

# ---------------------------------------------------------------------------------------------
# Part 1: in process

SYSTEM_PROMPT = (
    "You are a helpful assistant for an online shop. Answer briefly, cite the order number when "
    "there is one, and never promise a delivery date the warehouse has not confirmed."
)
USER_TURN = "Where is my order 4411? It was supposed to arrive on Tuesday and the tracking page"
ASSISTANT_TURN = "Order 4411 left the warehouse on Monday; the carrier shows it out for delivery."


def chat_body(turns: int, model: str) -> dict[str, Any]:
    """A chat completion request at `turns` user turns: the system prompt, the conversation so
    far, the first user message in content parts as SDKs send text with attachments."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM_PROMPT}]
    for turn in range(1, turns + 1):
        if turn == 1:
            content: Any = [
                {"type": "text", "text": USER_TURN},
                {"type": "text", "text": "(sent from the mobile app)"},
            ]
        else:
            content = f"{USER_TURN} (turn {turn})"
        messages.append({"role": "user", "content": content})
        if turn < turns:
            messages.append({"role": "assistant", "content": ASSISTANT_TURN})
    return {"model": model, "messages": messages, "temperature": 0.2, "max_tokens": 400}


def session_share(probability: float, min_turn: int, sticky: int, turns: range) -> float:
    """The expected share of a per-session rule's requests that are replaced, for sessions
    whose requests are spread evenly over `turns` (all at or after `min_turn`): the first
    replaced turn is geometric from `min_turn` on, and a turn t is replaced when that first
    turn f has f <= t < f + sticky."""
    total = 0.0
    for t in turns:
        total += sum(
            (1 - probability) ** (f - min_turn) * probability
            for f in range(max(min_turn, t - sticky + 1), t + 1)
        )
    return total / len(turns)


def in_process(calls: int, *, seed: int = 12) -> dict[str, Any]:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llmrotate_site.settings")
    # Nothing is written there; settings only need a data directory to exist.
    os.environ.setdefault("LLMROTATE_DATA_DIR", tempfile.mkdtemp(prefix="llmrotate-bench-"))
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    from django.http.request import HttpHeaders

    from keys.health import KeyPolicy
    from keys.replacement import ReplacementSpec
    from keys.routing import (
        DeploymentInfo,
        ProviderInfo,
        RouteInfo,
        RoutingSnapshot,
        TokenInfo,
        UpstreamKey,
    )
    from proxy.callers import Caller
    from proxy.replacement import replacement_assign

    def provider(name: str, kind: str, n_keys: int) -> ProviderInfo:
        keys = tuple(
            UpstreamKey(
                key_id=f"{name}-{i}",
                provider=name,
                secret=f"sk-{name}-{i:020d}",
                masked=f"sk-…{i:04d}",
                priority=0,
                weight=1,
                models=frozenset(),
            )
            for i in range(n_keys)
        )
        return ProviderInfo(name, kind, f"https://{name}.example/v1", KeyPolicy(), keys)

    openai = provider("openai", "openai", 3)
    anthropic = provider("anthropic", "anthropic", 2)
    azure = provider("azure", "openai", 2)

    def own(p: ProviderInfo, model: str, position: int = 0) -> DeploymentInfo:
        return DeploymentInfo(position=position, provider=p, model=model, keys=p.keys)

    def target(p: ProviderInfo, model: str, rule: str) -> tuple[DeploymentInfo, ...]:
        # As keys.routing._replacements_load builds them.
        return (
            DeploymentInfo(
                position=100_000, provider=p, model=model, keys=p.keys, replacement=rule
            ),
        )

    route_deployments = (own(openai, "gpt-4o"), own(azure, "gpt-4o", 1))
    rules_route = RouteInfo("chat", "health_aware", 0, route_deployments)
    plain_route = RouteInfo("chat-plain", "health_aware", 0, route_deployments)
    common = {"active_from": None, "active_until": None}
    specs = (
        ReplacementSpec(
            name="ci-canary", seed="ci-canary", probability=0.5, per_session=False,
            sticky_turns=10, min_turn=0, clients=frozenset({"ci-bot"}), without_tools=False,
            without_images=False, target="openai/gpt-4.1", **common,
            deployments=target(openai, "gpt-4.1", "ci-canary"),
        ),
        ReplacementSpec(
            name="sessions-to-mini", seed="sessions-to-mini", probability=0.1,
            per_session=True, sticky_turns=5, min_turn=3, clients=frozenset(),
            without_tools=True, without_images=True, target="openai/gpt-4o-mini", **common,
            deployments=target(openai, "gpt-4o-mini", "sessions-to-mini"),
        ),
        ReplacementSpec(
            name="requests-to-haiku", seed="requests-to-haiku", probability=0.1,
            per_session=False, sticky_turns=10, min_turn=0, clients=frozenset(),
            without_tools=False, without_images=False,
            target="anthropic/claude-3-5-haiku-latest", **common,
            deployments=target(anthropic, "claude-3-5-haiku-latest", "requests-to-haiku"),
        ),
    )  # fmt: skip
    snapshot = RoutingSnapshot(
        routes={"chat": rules_route, "chat-plain": plain_route},
        replacements={"chat": specs},
        loaded_at=time.time(),
    )
    client = TokenInfo(
        id=1, name="app", token_hash="0" * 64, routes=frozenset({"*"}),
        scopes=frozenset({"proxy"}), revoked=False,
    )  # fmt: skip
    # What the view passes: Django's case-insensitive headers of the request.
    headers = HttpHeaders(
        {
            "CONTENT_TYPE": "application/json",
            "CONTENT_LENGTH": "1830",
            "HTTP_AUTHORIZATION": "Bearer llmr-0123456789abcdef",
            "HTTP_USER_AGENT": "OpenAI/Python 1.54.3",
            "HTTP_ACCEPT": "application/json",
            "HTTP_X_STAINLESS_LANG": "python",
        }
    )
    bodies = {t: chat_body(t, "chat") for t in range(1, MAX_TURN + 1)}
    rng = random.Random(seed)
    sessions = [f"sess-{rng.getrandbits(64):016x}" for _ in range(SESSIONS)]
    requests = []
    for _ in range(calls + WARMUP_CALLS):
        turn = rng.randint(1, MAX_TURN)
        caller = Caller(
            user_agent="OpenAI/Python 1.54.3", session_id=rng.choice(sessions), turn=turn
        )
        requests.append((caller, bodies[turn], uuid.UUID(int=rng.getrandbits(128)).hex))
    now = time.time()
    clock = time.perf_counter_ns

    for caller, body, request_id in requests[:WARMUP_CALLS]:
        for route in (plain_route, rules_route):
            replacement_assign(
                snapshot, route, client=client, caller=caller, body=body, headers=headers,
                request_id=request_id, now=now,
            )  # fmt: skip
    measured = requests[WARMUP_CALLS:]

    # Per call: each request on both routes, one after the other, the order turned around
    # every other request.
    plain_ns: list[int] = []
    rules_ns: list[int] = []
    arms: Counter[tuple[str, str]] = Counter()
    by_arm_ns: dict[str, list[int]] = {}
    by_turn_ns: dict[int, list[int]] = {}
    for i, (caller, body, request_id) in enumerate(measured):
        for route in (plain_route, rules_route) if i % 2 == 0 else (rules_route, plain_route):
            t0 = clock()
            _, assignment = replacement_assign(
                snapshot, route, client=client, caller=caller, body=body, headers=headers,
                request_id=request_id, now=now,
            )  # fmt: skip
            t1 = clock()
            if route is plain_route:
                plain_ns.append(t1 - t0)
            else:
                rules_ns.append(t1 - t0)
                key = (assignment.rule, assignment.arm) if assignment else ("", "none")
                arms[key] += 1
                by_arm_ns.setdefault(key[1], []).append(t1 - t0)
                by_turn_ns.setdefault(caller.turn, []).append(t1 - t0)
    timer = []
    for _ in range(min(calls, 50_000)):
        t0 = clock()
        timer.append(clock() - t0)

    # Batched: one clock read around all the calls of a route, divided by their number.
    batched: dict[str, float] = {}
    for name, route in (("plain", plain_route), ("rules", rules_route)):
        t0 = clock()
        for caller, body, request_id in measured:
            replacement_assign(
                snapshot, route, client=client, caller=caller, body=body, headers=headers,
                request_id=request_id, now=now,
            )  # fmt: skip
        batched[name] = (clock() - t0) / len(measured) / 1000

    def quantiles(ns: list[int]) -> dict[str, float]:
        us = sorted(v / 1000 for v in ns)
        return {q: percentile(us, f) for q, f in QUANTILES.items()} | {"mean": sum(us) / len(us)}

    plain, rules = quantiles(plain_ns), quantiles(rules_ns)
    cost = {q: rules[q] - plain[q] for q in rules}
    # What the draws should give: requests-to-haiku sees turns 1-2 (the per-session rule takes
    # turns 3 on), sessions-to-mini turns 3-12.
    by_rule: dict[str, dict[str, Any]] = {}
    for spec in specs:
        counts = {arm: n for (rule, arm), n in arms.items() if rule == spec.name}
        eligible = sum(counts.values())
        replaced = counts.get("replaced", 0)
        by_rule[spec.name] = {
            "eligible": eligible,
            "arms": counts,
            "replaced_share": replaced / eligible if eligible else None,
        }
    by_rule["requests-to-haiku"]["expected_share"] = specs[2].probability
    by_rule["sessions-to-mini"]["expected_share"] = session_share(
        specs[1].probability, specs[1].min_turn, specs[1].sticky_turns, range(3, MAX_TURN + 1)
    )
    by_rule["ci-canary"]["expected_share"] = None
    replaced_total = sum(n for (_, arm), n in arms.items() if arm == "replaced")
    return {
        "calls": len(measured),
        "timing": "time.perf_counter_ns around each call; figures in microseconds",
        "timer_us": quantiles(timer),
        "plain_us": plain,
        "rules_us": rules,
        "rule_cost_us": cost,
        # A replaced request also builds its route with the target in front.
        "rules_us_by_arm": {arm: quantiles(ns) for arm, ns in sorted(by_arm_ns.items())},
        # Longer conversations: more messages for the image condition to read.
        "rules_us_by_turn": {turn: quantiles(ns) for turn, ns in sorted(by_turn_ns.items())},
        "batched_mean_us": batched | {"cost": batched["rules"] - batched["plain"]},
        "replaced_share": replaced_total / len(measured),
        "no_rule_share": arms.get(("", "none"), 0) / len(measured),
        "by_rule": by_rule,
        "rules": [
            {
                "name": s.name,
                "probability": s.probability,
                "per_session": s.per_session,
                "min_turn": s.min_turn,
                "sticky_turns": s.sticky_turns,
                "clients": sorted(s.clients),
                "without_tools": s.without_tools,
                "without_images": s.without_images,
                "target": s.target,
            }
            for s in specs
        ],
        "body_bytes": {t: len(json.dumps(b)) for t, b in bodies.items() if t in (1, 6, 12)},
    }


def in_process_table(r: dict[str, Any]) -> str:
    lines = [
        f"In process: replacement_assign, {r['calls']:,} requests per route (distinct request"
        f" ids, {SESSIONS:,} sessions, turns 1-{MAX_TURN}); {r['timing']}.",
        "",
        "| route | p50 | p95 | p99 | mean | batched mean |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, key, batch in (
        ("no rules (`chat-plain`)", "plain_us", "plain"),
        ("three rules (`chat`)", "rules_us", "rules"),
    ):
        v = r[key]
        lines.append(
            f"| {label} | {v['p50']:.2f} | {v['p95']:.2f} | {v['p99']:.2f} | {v['mean']:.2f} |"
            f" {r['batched_mean_us'][batch]:.2f} |"
        )
    c = r["rule_cost_us"]
    lines.append(
        f"| **rules: difference** | **{c['p50']:+.2f}** | {c['p95']:+.2f} | {c['p99']:+.2f} |"
        f" {c['mean']:+.2f} | {r['batched_mean_us']['cost']:+.2f} |"
    )
    t = r["timer_us"]
    by_arm = "; ".join(
        f"{arm} {v['p50']:.2f} / {v['p99']:.2f}" for arm, v in r["rules_us_by_arm"].items()
    )
    lines += [
        "",
        f"Timer (two back-to-back perf_counter_ns, in both sides): p50 {t['p50']:.2f} µs.",
        f"With rules, by arm, p50 / p99 µs: {by_arm}.",
        "With rules, by turn, p50 µs: "
        + ", ".join(f"{turn}: {v['p50']:.2f}" for turn, v in r["rules_us_by_turn"].items())
        + ".",
        f"Replaced: {r['replaced_share']:.1%} of requests; no rule eligible:"
        f" {r['no_rule_share']:.1%}.",
        "",
        "| rule | eligible | arms | replaced share | expected |",
        "|---|---:|---|---:|---:|",
    ]
    for name, v in r["by_rule"].items():
        share = "-" if v["replaced_share"] is None else f"{v['replaced_share']:.3f}"
        expected = "-" if v["expected_share"] is None else f"{v['expected_share']:.3f}"
        arms = ", ".join(f"{k} {n:,}" for k, n in sorted(v["arms"].items())) or "none"
        lines.append(f"| {name} | {v['eligible']:,} | {arms} | {share} | {expected} |")
    lines += [
        "",
        verdict("In process: three rules add", [c["p50"] / 1000], TARGET_MS),
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Part 2: through the gateway

PLAIN, RULES = "plain-4o-mini", "rules-4o-mini"  # same length: equal bodies
FAST_SCRIPT = {"default": {"latency_ms": 0, "token_delay_ms": 0, "completion_tokens": 16}}
GATEWAY_CONFIG = f"""\
providers:
  fake: {{{{kind: openai, base_url: "{{upstream}}"}}}}
keys:
  - {{{{id: fake-1, provider: fake, secret: "literal://{{key1}}"}}}}
  - {{{{id: fake-2, provider: fake, secret: "literal://{{key2}}"}}}}
routes:
  {PLAIN}: {{{{strategy: health_aware, deployments: [{{{{provider: fake, model: {{model}}}}}}]}}}}
  {RULES}: {{{{strategy: health_aware, deployments: [{{{{provider: fake, model: {{model}}}}}}]}}}}
clients:
  - {{{{name: bench, routes: ["*"], scopes: [proxy]}}}}
"""
# The rules of the gateway's `rules-4o-mini`, all aimed at the route's own deployment so that a
# replaced request makes the same upstream call. The benchmark's calls are turn 2 of a session.
GATEWAY_RULES: list[dict[str, Any]] = [
    {"name": "ci-canary", "clients": ["ci-bot"], "probability": 0.5},
    {
        "name": "sessions-to-mini", "stickiness": "per_session", "min_turn": 3,
        "probability": 0.1, "sticky_turns": 5, "without_tools": True, "without_images": True,
    },
    {"name": "requests-to-mini", "probability": 0.1},
]  # fmt: skip
REPLACED_HEADER = "x-llmrotate-replacement"
SESSION = "bench-session-0001"
CHECK_CALLS = 200


@dataclass(frozen=True)
class ChatTarget(Target):
    """The loadgen target with a realistic body: a system prompt and turn 2 of a session."""

    def body(self, *, stream: bool) -> bytes:
        payload = chat_body(2, self.model)
        payload.pop("max_tokens")  # the fake's scripted answer decides the length
        if stream:
            payload["stream"] = True
        return json.dumps(payload, separators=(",", ":")).encode()

    def headers(self) -> dict[str, str]:
        return {**super().headers(), "x-session-id": SESSION}


def create_rules(stack: Stack) -> None:
    """The rules, through the model's validation, before the gateway starts (so its first
    routing snapshot has them)."""
    code = (
        "import json\n"
        "from keys.models import Provider, ReplacementRule, Route\n"
        f"route = Route.objects.get(name={RULES!r})\n"
        "fake = Provider.objects.get(name='fake')\n"
        f"for position, fields in enumerate(json.loads({json.dumps(GATEWAY_RULES)!r})):\n"
        "    rule = ReplacementRule(route=route, position=position, target_provider=fake,\n"
        f"                           target_model={ROUTE_MODEL!r}, **fields)\n"
        "    rule.full_clean()\n"
        "    rule.save()\n"
        "print(ReplacementRule.objects.count())\n"
    )
    out = stack._manage("shell", "-c", code)
    if out.strip().splitlines()[-1:] != [str(len(GATEWAY_RULES))]:
        raise ServerError(f"the replacement rules were not created:\n{out}")


async def check_rules_apply(targets: dict[str, Target]) -> dict[str, int]:
    """Calls on both routes until the rules route has answered one replaced call: the plain
    route must never say it replaced, or the run would compare two routes with rules."""
    seen: Counter[str] = Counter()
    async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
        for i in range(CHECK_CALLS):
            for name in (PLAIN, RULES):
                target = targets[name]
                response = await client.post(
                    target.url, content=target.body(stream=False), headers=target.headers()
                )
                if response.status_code != 200:
                    raise ServerError(
                        f"{name}: status {response.status_code}: {response.text[:300]}"
                    )
                rule = response.headers.get(REPLACED_HEADER)
                if rule and name == PLAIN:
                    raise ServerError(f"{PLAIN} (no rules) answered {REPLACED_HEADER}: {rule}")
                if rule:
                    seen[rule] += 1
            if seen and i >= 20:
                return dict(seen)
    raise ServerError(f"{RULES}: no replaced answer in {CHECK_CALLS} calls")


def overhead(out: dict[str, dict[str, Any]]) -> dict[str, float]:
    figures = {f"rules_{q}": out[RULES][q] - out[PLAIN][q] for q in ("p50", "p99")}
    cpu_on, cpu_off = out[RULES].get("cpu_ms_per_request"), out[PLAIN].get("cpu_ms_per_request")
    if cpu_on is not None and cpu_off is not None:
        figures["rules_cpu_ms"] = cpu_on - cpu_off
    return figures


def describe(kind: str, figures: dict[str, Any]) -> str:
    return (
        f"{kind} rules p50 {figures['rules_p50']:+.3f} ms"
        f" (CPU {figures.get('rules_cpu_ms', float('nan')):+.3f} ms/request)"
    )


def arms_recorded(stack: Stack) -> dict[str, int]:
    """Final call records by experiment and arm: which requests the rules took."""
    path = stack.data_dir / "llmrotate.sqlite3"
    with sqlite3.connect(path) as db:
        rows = db.execute(
            "SELECT requested_model, experiment, arm, COUNT(*) FROM usage_callrecord"
            " WHERE final GROUP BY 1, 2, 3"
        ).fetchall()
    return {
        f"{model} {experiment or '-'} {arm or '-'}": int(n) for model, experiment, arm, n in rows
    }


def one_run(index: int, args: argparse.Namespace) -> dict[str, Any]:
    usable = os.sched_getaffinity(0)
    pin = len(usable) >= 2 and not args.no_pin
    gateway_cpu, load_cpu = (1, 0) if pin else (None, None)
    stack = Stack.create(keep_data=False)
    try:
        stack.start_upstream(cpu=load_cpu)
        if not asyncio.run(script_upstream(stack.upstream_url, FAST_SCRIPT)):
            raise ServerError("could not script the fake upstream")
        stack.configure_gateway(stack.upstream_url, template=GATEWAY_CONFIG)
        if not args.no_rules:
            create_rules(stack)
        stack.start_gateway(cpu=gateway_cpu, extra_args=["--no-worker", "--no-beat"])
        assert stack.gateway_pid is not None
        targets: dict[str, Target] = {
            "direct": ChatTarget("direct", stack.upstream_url, UPSTREAM_KEYS[0], ROUTE_MODEL),
            PLAIN: ChatTarget(PLAIN, stack.gateway_url, stack.token, PLAIN),
            RULES: ChatTarget(RULES, stack.gateway_url, stack.token, RULES),
        }
        pids = dict.fromkeys((PLAIN, RULES), stack.gateway_pid)
        if load_cpu is not None:
            os.sched_setaffinity(0, {load_cpu})
        check = {} if args.no_rules else asyncio.run(check_rules_apply(targets))
        ours = (os.getpid(), *(p for c in stack.children for p in (c.pid, *descendants(c.pid))))
        meter = CpuMeter({"ours": ours}, owns_all=True)
        start, t0 = meter.snapshot(), time.perf_counter()
        print(f"gateway run {index + 1}:", flush=True)
        levels = asyncio.run(
            measure_kinds(
                targets, pids, args.requests, args.levels, overhead=overhead, describe=describe
            )
        )
        seconds = time.perf_counter() - t0
        other = meter.other_percent(start, meter.snapshot(), seconds)
        stack.stop_gateway()  # flushes the call records
        arms = arms_recorded(stack)
    finally:
        os.sched_setaffinity(0, usable)
        stack.close()
    if other is not None and other > BUSY_MACHINE_PERCENT:
        print(f"  warning: other programs used {other:.0f}% of a core during this run")
    print(f"  call records (route, rule, arm): {arms}", flush=True)
    return {
        "run": index + 1,
        "seconds": round(seconds, 1),
        "other_programs_cpu_percent": None if other is None else round(other, 1),
        "check_replaced": check,
        "final_records_by_arm": arms,
        "levels": levels,
    }


def gateway_table(runs: list[dict[str, Any]], *, what: str = "three rules add") -> str:
    lines = [
        "Through the gateway: two routes on the same deployment, ms.",
        "",
        "| concurrency | call | run | direct p50 | added p50, no rules / rules |"
        " **rules: p50** / p99 | gateway CPU ms/request, no rules / rules | replaced share |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    verdicts = []
    for li, first in enumerate(runs[0]["levels"]):
        concurrency = first["concurrency"]
        for kind in KINDS:
            p50s = []
            for run in runs:
                r = run["levels"][li][kind]
                p50s.append(r["rules_p50"])
                cpu = " / ".join(
                    f"{r[n].get('cpu_ms_per_request', float('nan')):.3f}" for n in (PLAIN, RULES)
                )
                arms = run["final_records_by_arm"]
                rules_total = sum(n for k, n in arms.items() if k.startswith(RULES))
                replaced = sum(
                    n for k, n in arms.items() if k.startswith(RULES) and k.endswith(" replaced")
                )
                share = f"{replaced / rules_total:.3f}" if rules_total else "-"
                lines.append(
                    f"| {concurrency} | {kind} | {run['run']} | {r['direct']['p50']:.3f} |"
                    f" {r[PLAIN]['added_p50']:+.3f} / {r[RULES]['added_p50']:+.3f} |"
                    f" **{r['rules_p50']:+.3f}** / {r['rules_p99']:+.3f} | {cpu} | {share} |"
                )
            if concurrency == 1:
                verdicts.append(verdict(f"Gateway, {kind}, concurrency 1: {what}", p50s, TARGET_MS))
    return "\n".join([*lines, "", *verdicts])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    campaign_arguments(p, requests_help="gateway: requests per target per level and kind")
    p.add_argument("--calls", type=int, help=f"in process: requests per route (default {CALLS:,})")
    p.add_argument("--in-process", action="store_true", help="part 1 only: no servers")
    p.add_argument(
        "--no-rules",
        action="store_true",
        help="calibration: the gateway's rules route gets no rules (both routes alike), to see"
        " how far two routes of one process differ with nothing between them",
    )
    args = p.parse_args(argv)
    runs_wanted = campaign_defaults(args)
    if args.concurrency is None:
        args.levels = (1,)
    calls = args.calls or (QUICK_CALLS if args.quick else CALLS)
    started = dt.datetime.now(dt.UTC)
    t0 = time.perf_counter()

    usable = os.sched_getaffinity(0)
    if args.wait_quiet > 0:
        from proxy_overhead import wait_for_quiet_machine

        wait_for_quiet_machine(args.wait_quiet)
    if len(usable) >= 2 and not args.no_pin:
        os.sched_setaffinity(0, {max(usable)})  # the core the gateway gets in part 2
    meter = CpuMeter({"ours": (os.getpid(),)}, owns_all=True)
    start, t1 = meter.snapshot(), time.perf_counter()
    try:
        local = in_process(calls)
    finally:
        os.sched_setaffinity(0, usable)
    other = meter.other_percent(start, meter.snapshot(), time.perf_counter() - t1)
    local["other_programs_cpu_percent"] = None if other is None else round(other, 1)
    if other is not None and other > BUSY_MACHINE_PERCENT:
        print(f"warning: other programs used {other:.0f}% of a core during the in-process part")
    cost = local["rule_cost_us"]
    print(
        f"in process: three rules add {cost['p50']:+.2f} µs at p50"
        f" ({cost['p95']:+.2f} p95, {cost['p99']:+.2f} p99) over {local['calls']:,} requests",
        flush=True,
    )

    runs: list[dict[str, Any]] = []
    if not args.in_process:
        got = campaign_runs(runs_wanted, args, lambda i: one_run(i, args))
        if got is None:
            return 1
        runs = got
    report = {
        "benchmark": "replacement_rules",
        "schema": 1,
        "started_at": started.isoformat(timespec="seconds"),
        "duration_seconds": round(time.perf_counter() - t0, 1),
        "machine": machine_info(len(usable)),
        "target_ms": TARGET_MS,
        "in_process": local,
        "gateway": {
            "setup": {
                "database": "sqlite",
                "routes": {PLAIN: f"fake/{ROUTE_MODEL}", RULES: f"fake/{ROUTE_MODEL}"},
                "rules": [] if args.no_rules else GATEWAY_RULES,
                "requests_per_target_per_level": args.requests,
                "levels": list(args.levels),
                "pinning": not args.no_pin and len(usable) >= 2,
            },
            "runs": runs,
        },
    }
    text = in_process_table(local)
    if runs:
        what = "with no rules, the routes differ by" if args.no_rules else "three rules add"
        text += "\n\n" + gateway_table(runs, what=what)
    campaign_write("replacement_rules", report, args, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
