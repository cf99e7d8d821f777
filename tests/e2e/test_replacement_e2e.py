"""Model replacement experiments (issue #12) end to end: the official openai and anthropic
SDKs, unchanged, through the live gateway to the real fake upstream, with ReplacementRule rows
written through the ORM; then the call records, and the replacement metrics API compared with
figures computed here from those raw records.

The route `exp-route` serves `model-a`; the rules send a share of it to `model-b` on the same
provider. Each model has a key of its own (a key's `models`), so the fake upstream's per-key
counters are per-model counters, and a fault scripted on key-b fails model-b only.

Records are written by the recorder thread after the answer is out: every check waits for its
rows with a deadline (`call_records`) instead of sleeping.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import anthropic
import httpx
import openai
import pytest

from keys.replacement import replacement_draw, session_first_turn
from tests.e2e.conftest import KEY_SECRETS, LiveGateway, call_records, gateway_config, wait_for
from usage.histograms import METRICS, RELATIVE_ERROR_BOUND, exact_percentile

pytestmark = pytest.mark.timeout(60)

EXP_ROUTE = "exp-route"
MODEL_A, MODEL_B = "model-a", "model-b"
PROVIDER = "fake"
REPLACED_HEADER = "x-llmrotate-replacement"
FALLBACK_HEADER = "x-llmrotate-replacement-fallback"
SECRET_A, SECRET_B = KEY_SECRETS["key-a"], KEY_SECRETS["key-b"]
PROMPT: list[Any] = [{"role": "user", "content": "Say hi"}]
TOOL_CALLS = [
    {"name": "get_weather", "arguments": {"city": "Paris"}},
    {"name": "search_docs", "arguments": {"query": "rotate"}},
]


def experiment_config(base_url: str, **clients: dict[str, Any]) -> dict[str, Any]:
    """The live gateway's configuration plus `exp-route` on model-a, with key-a serving
    model-a only and key-b model-b only; `clients` adds tokens (name → fields)."""
    config = gateway_config(base_url)
    for key in config["keys"]:
        key["models"] = [MODEL_A] if key["id"] == "key-a" else [MODEL_B]
    config["routes"] = {
        EXP_ROUTE: {
            "strategy": "round_robin",
            "deployments": [{"provider": PROVIDER, "model": MODEL_A}],
        }
    }
    config["clients"] = [
        *config["clients"],
        *({"name": name, "routes": ["*"], **fields} for name, fields in clients.items()),
    ]
    return config


@pytest.fixture
def experiment(live_gateway: LiveGateway) -> LiveGateway:
    """The live gateway with `exp-route` (no rule yet)."""
    from keys.config_io import config_import

    config_import(data=experiment_config(live_gateway.upstream.base_url))
    return live_gateway


def rule(name: str, **fields: Any) -> Any:
    """A validated ReplacementRule on `exp-route` targeting fake/model-b (unless `fields`
    says otherwise), seen by the gateway at once."""
    from keys.models import Provider, ReplacementRule, Route
    from keys.routing import invalidate_routing_cache

    fields.setdefault("target_provider", Provider.objects.get(name=PROVIDER))
    fields.setdefault("target_model", MODEL_B)
    row = ReplacementRule(name=name, route=Route.objects.get(name=EXP_ROUTE), **fields)
    row.full_clean()
    row.save()
    invalidate_routing_cache()
    return row


def conversation(turn: int) -> list[Any]:
    """A conversation at its `turn`-th user message (the gateway's turn number)."""
    messages: list[Any] = []
    for i in range(1, turn + 1):
        if i > 1:
            messages.append({"role": "assistant", "content": f"Answer {i - 1}"})
        messages.append({"role": "user", "content": f"Question {i}"})
    return messages


def per_request_id(records: Iterable[Any]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for row in sorted(records, key=lambda r: (r.request_id, r.attempt)):
        out.setdefault(row.request_id, []).append(row)
    return out


def request_id(raw: Any) -> str:
    return str(raw.headers["x-llmrotate-request-id"])


# --- a 50 % per-request rule ----------------------------------------------------------------


def test_a_50_percent_rule_sends_about_half_the_traffic_to_each_model(experiment: LiveGateway):
    rule("half", probability=0.5)
    client = experiment.openai()
    n = 200

    def call(i: int) -> Any:
        return client.chat.completions.with_raw_response.create(
            model=EXP_ROUTE, messages=[{"role": "user", "content": f"Say hi {i}"}]
        )

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(call, range(n)))

    replaced_ids = set()
    for raw in answers:
        completion = raw.parse()
        replaced = raw.headers.get(REPLACED_HEADER)
        # The response names the model that answered; the fake upstream echoes the model it
        # was asked for, so the two agree only if the gateway passed the answer's model on.
        assert completion.model == (MODEL_B if replaced else MODEL_A), (replaced, completion)
        assert replaced in (None, "half")
        assert FALLBACK_HEADER not in raw.headers
        if replaced:
            replaced_ids.add(request_id(raw))
    k = len(replaced_ids)
    # Binomial(200, 0.5): 4 standard deviations is about 28 requests either side of 100.
    assert abs(k - n * 0.5) <= 4 * math.sqrt(n * 0.25), f"{k} of {n} replaced"
    # What the fake upstream received: model-b only on key-b, model-a only on key-a.
    assert experiment.requests_per_key() == {"key-a": n - k, "key-b": k}
    received = Counter((r.key, (r.body or {}).get("model")) for r in experiment.upstream.requests())
    assert received == {(SECRET_A, MODEL_A): n - k, (SECRET_B, MODEL_B): k}

    rows = call_records(n)
    by_request = per_request_id(rows)
    assert set(by_request) == {request_id(raw) for raw in answers}
    for rid, [row] in by_request.items():
        replaced = rid in replaced_ids
        assert (row.attempt, row.final, row.outcome) == (1, True, "success")
        assert (row.experiment, row.arm) == ("half", "replaced" if replaced else "control")
        assert row.replacement_attempt is replaced
        assert (row.provider, row.upstream_model, row.requested_model) == (
            PROVIDER,
            MODEL_B if replaced else MODEL_A,
            EXP_ROUTE,
        )
        # The draw is reproducible from the request id and the seed (the rule's name).
        assert (replacement_draw("half", rid) < 0.5) is replaced


# --- per-session rules ----------------------------------------------------------------------


Send = Callable[
    [str, int], tuple[str, str, str | None]
]  # (session, turn) → (request id, model, rule)


@pytest.fixture
def closing() -> Iterator[contextlib.ExitStack]:
    """Closes the clients a test opens on it."""
    with contextlib.ExitStack() as stack:
        yield stack


def openai_turn(gateway: LiveGateway, stack: contextlib.ExitStack) -> Send:
    client = gateway.openai()  # closed by the live_gateway fixture

    def send(session: str, turn: int) -> tuple[str, str, str | None]:
        raw = client.chat.completions.with_raw_response.create(
            model=EXP_ROUTE, messages=conversation(turn), extra_headers={"X-Session-Id": session}
        )
        return request_id(raw), raw.parse().model, raw.headers.get(REPLACED_HEADER)

    return send


def anthropic_turn(gateway: LiveGateway, stack: contextlib.ExitStack) -> Send:
    client = stack.enter_context(
        anthropic.Anthropic(
            base_url=gateway.base_url, api_key=gateway.token, max_retries=0, timeout=20
        )
    )

    def send(session: str, turn: int) -> tuple[str, str, str | None]:
        raw = client.messages.with_raw_response.create(
            model=EXP_ROUTE,
            max_tokens=64,
            messages=conversation(turn),
            extra_headers={"X-Session-Id": session},
        )
        return request_id(raw), raw.parse().model, raw.headers.get(REPLACED_HEADER)

    return send


SDKS = {"openai": openai_turn, "anthropic": anthropic_turn}


@pytest.mark.parametrize("sdk", sorted(SDKS))
def test_a_per_session_rule_keeps_the_session_on_the_replacement(
    experiment: LiveGateway, closing: contextlib.ExitStack, sdk: str
):
    rule(
        "sticky",
        probability=1.0,
        stickiness="per_session",
        min_turn=2,
        sticky_turns=3,
    )
    send = SDKS[sdk](experiment, closing)
    session = f"session-{sdk}"
    answers = [send(session, turn) for turn in range(1, 6)]

    # Turn 1 is before min_turn; turns 2, 3 and 4 are the sticky window; turn 5 is back.
    expected = [False, True, True, True, False]
    got = [(model, header) for _, model, header in answers]
    assert got == [(MODEL_B, "sticky") if r else (MODEL_A, None) for r in expected]

    rows = per_request_id(call_records(5))
    for turn, ((rid, _, _), replaced) in enumerate(zip(answers, expected, strict=True), 1):
        [row] = rows[rid]
        assert (row.session_id, row.turn) == (session, turn)
        assert row.upstream_model == (MODEL_B if replaced else MODEL_A)
        assert row.replacement_attempt is replaced
        # Turn 1 is not eligible (no experiment); turn 5 is, and drew "not replaced".
        assert (row.experiment, row.arm) == (
            ("", "") if turn == 1 else ("sticky", "replaced" if replaced else "control")
        )
        assert row.replacement_start is (turn == 2)


def test_a_half_per_session_rule_gives_each_session_one_answer_per_window(
    experiment: LiveGateway, closing: contextlib.ExitStack
):
    rule("coin", probability=0.5, stickiness="per_session", sticky_turns=3)
    send = openai_turn(experiment, closing)
    sessions = [f"conv-{i}" for i in range(8)]
    turns = range(1, 7)
    expected = {}
    for session in sessions:
        first = session_first_turn("coin", session, probability=0.5, min_turn=0)
        for turn in turns:
            expected[session, turn] = first <= turn < first + 3
    # The session names are fixed, so this is a fact about them, not luck: the check below
    # sees sessions replaced and not, and windows that start after turn 1 and end.
    assert any(expected.values()) and not all(expected.values())
    assert any(expected[s, 1] != expected[s, 4] for s in sessions)

    # Every turn twice, from interleaved sessions: the answer never depends on the request.
    answers: dict[tuple[str, int], set[bool]] = {}
    for turn in turns:
        for _ in range(2):
            for session in sessions:
                _, model, header = send(session, turn)
                assert (model == MODEL_B) is (header == "coin")
                answers.setdefault((session, turn), set()).add(header == "coin")
    assert answers == {key: {value} for key, value in expected.items()}


# --- opt-outs -------------------------------------------------------------------------------


def test_opt_outs_by_header_body_field_and_token_are_honoured(live_gateway: LiveGateway):
    from keys.config_io import config_import

    report = config_import(
        data=experiment_config(
            live_gateway.upstream.base_url, never={"scopes": ["proxy"], "never_replace": True}
        )
    )
    rule("always", probability=1.0)
    client = live_gateway.openai()
    never = live_gateway.openai(report.generated_tokens["never"])

    def ask(c: openai.OpenAI, **extra: Any) -> tuple[str, str, str | None]:
        raw = c.chat.completions.with_raw_response.create(model=EXP_ROUTE, messages=PROMPT, **extra)
        return request_id(raw), raw.parse().model, raw.headers.get(REPLACED_HEADER)

    plain = ask(client)
    by_header = ask(client, extra_headers={"X-LLMRotate-No-Replace": "1"})
    by_field = ask(client, extra_body={"llmrotate_no_replace": True})
    by_token = ask(never)
    # The rule replaces everything else: the opt-outs are what kept these on model-a.
    assert plain[1:] == (MODEL_B, "always")
    for answer in (by_header, by_field, by_token):
        assert answer[1:] == (MODEL_A, None)

    # The body field is ours: the upstream never sees it.
    bodies = [
        r.body for r in live_gateway.upstream.requests() if r.path.endswith("/chat/completions")
    ]
    assert len(bodies) == 4
    assert all(isinstance(b, dict) and "llmrotate_no_replace" not in b for b in bodies)

    rows = per_request_id(call_records(4))
    arms = {rid: (rows[rid][0].experiment, rows[rid][0].arm) for rid in rows}
    assert arms == {
        plain[0]: ("always", "replaced"),
        by_header[0]: ("always", "opt_out_header"),
        by_field[0]: ("always", "opt_out_header"),
        by_token[0]: ("always", "opt_out_token"),
    }


# --- a failing target -----------------------------------------------------------------------


def test_a_failing_target_falls_back_to_the_route_with_both_attempts_recorded(
    experiment: LiveGateway,
):
    rule("doomed", probability=1.0)
    experiment.script(key_b=[{"fault": "500"}])
    raw = experiment.openai().chat.completions.with_raw_response.create(
        model=EXP_ROUTE, messages=PROMPT
    )
    assert raw.status_code == 200
    assert raw.parse().model == MODEL_A
    assert raw.headers[REPLACED_HEADER] == "doomed"
    assert raw.headers[FALLBACK_HEADER] == "true"
    assert experiment.requests_per_key() == {"key-a": 1, "key-b": 1}

    first, second = call_records(2)
    assert first.request_id == second.request_id == request_id(raw)
    assert (first.attempt, first.upstream_model, first.replacement_attempt, first.final) == (
        1,
        MODEL_B,
        True,
        False,
    )
    assert first.outcome == "upstream_error" and first.status_code == 500
    assert (second.attempt, second.upstream_model, second.replacement_attempt) == (
        2,
        MODEL_A,
        False,
    )
    assert (second.final, second.outcome, second.client_status) == (True, "success", 200)
    for row in (first, second):
        assert (row.experiment, row.arm) == ("doomed", "replaced")


# --- the metrics API against the raw records ------------------------------------------------


def expected_metrics(rows: list[Any], rule_name: str) -> dict[str, Any]:
    """The figures of /v1/replacement/metrics for `rule_name`, computed from raw records:
    request figures from final records (one per request), amounts from every attempt."""
    mine = [r for r in rows if r.experiment == rule_name]
    finals = [r for r in mine if r.final]
    arms = Counter(r.arm for r in finals)

    def arm(name: str) -> dict[str, Any]:
        final = [r for r in finals if r.arm == name]
        every = [r for r in mine if r.arm == name and not r.usage_flagged]
        n = len(final)
        successes = sum(r.outcome == "success" for r in final)
        cost = sum((Decimal(r.cost_usd) for r in every if r.cost_usd is not None), Decimal(0))
        completion = sum(r.completion_tokens or 0 for r in every)
        tools = sum(r.tool_calls or 0 for r in mine if r.arm == name)
        per_request_cost: dict[str, float] = {}
        for r in every:
            per_request_cost[r.request_id] = per_request_cost.get(r.request_id, 0.0) + float(
                r.cost_usd or 0
            )
        return {
            "requests": n,
            "successes": successes,
            "success_rate": successes / n if n else None,
            "error_rate": 1 - successes / n if n else None,
            "errors_by_outcome": dict(Counter(r.outcome for r in final if r.outcome != "success")),
            "latency_ms": [r.latency_ms for r in final if r.latency_ms is not None],
            "ttft_ms": [r.ttft_ms for r in final if r.ttft_ms is not None],
            "completion_tokens": completion,
            "completion_tokens_per_request": completion / n if n else None,
            "cost_usd": float(cost),
            "cost_per_request_usd": float(cost) / n if n else None,
            "costs": [per_request_cost.get(r.request_id, 0.0) for r in final],
            "tool_calls": tools,
            "tool_calls_per_request": tools / n if n else None,
            "answered_by": dict(Counter(f"{r.provider}/{r.upstream_model}" for r in final)),
        }

    turns = Counter(r.turn for r in finals if r.replacement_start)
    return {
        "eligible": len(finals),
        "replaced": arms["replaced"],
        "control": arms["control"],
        "opt_outs": {"header": arms["opt_out_header"], "token": arms["opt_out_token"]},
        "sessions_replaced": len(
            {r.session_id for r in mine if r.arm == "replaced" and r.session_id}
        ),
        "first_replacement_turns": [{"turn": t, "requests": turns[t]} for t in sorted(turns)],
        "replaced_arm": arm("replaced"),
        "control_arm": arm("control"),
    }


Z95 = 1.959963984540054


def wilson(s: int, n: int) -> tuple[float, float]:
    p, z2 = s / n, Z95 * Z95
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return centre - half, centre + half


def newcombe(s1: int, n1: int, s2: int, n2: int) -> tuple[float, float, float]:
    """Newcombe's hybrid score interval of p1 - p2 (method 10 of his 1998 paper)."""
    p1, p2 = s1 / n1, s2 / n2
    (l1, u1), (l2, u2) = wilson(s1, n1), wilson(s2, n2)
    d = p1 - p2
    return (
        d,
        d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2),
        d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2),
    )


def welch(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Difference of means with a normal-approximation (Welch) 95 % interval."""

    def mean_var(x: list[float]) -> tuple[float, float]:
        m = sum(x) / len(x)
        return m, sum((v - m) ** 2 for v in x) / (len(x) - 1)

    (ma, va), (mb, vb) = mean_var(a), mean_var(b)
    half = Z95 * math.sqrt(va / len(a) + vb / len(b))
    return ma - mb, ma - mb - half, ma - mb + half


def close(got: Any, want: float | None, *, rel: float = 1e-6, abs_: float = 1e-12) -> bool:
    if want is None:
        return got is None
    return got is not None and math.isclose(float(got), want, rel_tol=rel, abs_tol=abs_)


def assert_percentiles(got: dict[str, Any], values: list[float], metric_name: str) -> None:
    """p50 and p95 from the rollups' histograms against the exact (nearest-rank) ones: within
    the histogram's documented error (usage/histograms.py), or its lowest boundary below it."""
    metric = next(m for m in METRICS if m.name == metric_name)
    for p in (50, 95):
        exact = exact_percentile(values, p=p)
        estimate = got[f"p{p}"]
        if exact is None:
            assert estimate is None, (metric_name, p, got)
            continue
        bound = RELATIVE_ERROR_BOUND * exact + 1e-6 if exact >= metric.low else metric.low
        assert estimate is not None and abs(estimate - exact) <= bound, (metric_name, p, got, exact)


def assert_arm(got: dict[str, Any], want: dict[str, Any], label: str) -> None:
    for field in ("requests", "successes", "completion_tokens", "tool_calls"):
        assert got[field] == want[field], (label, field, got[field], want[field])
    assert got["errors_by_outcome"] == want["errors_by_outcome"], label
    assert got["answered_by"] == want["answered_by"], label
    for field in (
        "success_rate",
        "error_rate",
        "completion_tokens_per_request",
        "cost_usd",
        "cost_per_request_usd",
        "tool_calls_per_request",
    ):
        assert close(got[field], want[field], rel=1e-6, abs_=1e-9), (label, field, got, want)
    assert_percentiles(got["latency_ms"], want["latency_ms"], "latency_ms")
    assert_percentiles(got["ttft_ms"], want["ttft_ms"], "ttft_ms")


def assert_rule_metrics(body: dict[str, Any], rows: list[Any], rule_name: str) -> None:
    [got] = [r for r in body["rules"] if r["rule"] == rule_name]
    want = expected_metrics(rows, rule_name)
    assert (got["route"], got["target"], got["probability"], got["stickiness"]) == (
        EXP_ROUTE,
        f"{PROVIDER}/{MODEL_B}",
        0.5,
        "per_request",
    )
    assert got["enabled"] is True
    for field in ("eligible", "replaced", "control", "opt_outs", "sessions_replaced"):
        assert got[field] == want[field], (field, got[field], want[field])
    assert got["first_replacement_turns"] == want["first_replacement_turns"]
    assert close(got["activation_rate"], want["replaced"] / want["eligible"])

    effect = got["effectiveness"]
    a, b = want["replaced_arm"], want["control_arm"]
    assert_arm(effect["replaced"], a, "replaced")
    assert_arm(effect["not_replaced"], b, "not replaced")

    assert effect["sample_too_small"] is (min(a["requests"], b["requests"]) < 30)
    success = effect["success_rate_difference"]
    d, low, high = newcombe(a["successes"], a["requests"], b["successes"], b["requests"])
    assert success["confidence"] == 0.95
    assert close(success["difference"], d) and close(success["low"], low)
    assert close(success["high"], high)
    cost = effect["cost_per_request_difference"]
    d, low, high = welch(a["costs"], b["costs"])
    assert close(cost["difference"], d, abs_=1e-12) and close(cost["low"], low, abs_=1e-12)
    assert close(cost["high"], high, abs_=1e-12)
    assert isinstance(effect["summary"], str) and effect["summary"]


def test_replacement_metrics_match_the_raw_records(live_gateway: LiveGateway):
    from keys.config_io import config_import
    from usage.models import CallRecord, ModelPrice
    from usage.pricing import price_overrides_invalidate
    from usage.recorder import get_recorder
    from usage.sketches import sketch_position

    report = config_import(
        data=experiment_config(
            live_gateway.upstream.base_url,
            never={"scopes": ["proxy"], "never_replace": True},
            watcher={"scopes": ["monitor"]},
        )
    )
    # model-b is the cheaper one; prompts of different lengths give costs a spread.
    ModelPrice.objects.create(model=MODEL_A, input_per_mtok=3, output_per_mtok=15)
    ModelPrice.objects.create(model=MODEL_B, input_per_mtok=1, output_per_mtok=4)
    price_overrides_invalidate()
    rule("metrics", probability=0.5)
    since = datetime.now(UTC) - timedelta(minutes=1)

    # Latency inside the histograms' grid (16 ms and up), so percentiles have their bound.
    # key-a (model-a): two client errors and two tool-call answers first; key-b (model-b):
    # one client error, three tool-call answers.
    tool = {"fault": "tool_call", "tool_calls": TOOL_CALLS}
    live_gateway.upstream.script(
        {
            "keys": {
                SECRET_A: {
                    "queue": [{"fault": "400"}, tool, {"fault": "400"}, tool],
                    "default": {"latency_ms": 20},
                },
                SECRET_B: {
                    "queue": [tool, {"fault": "400"}, tool, tool],
                    "default": {"latency_ms": 35},
                },
            }
        }
    )
    client = live_gateway.openai()
    never = live_gateway.openai(report.generated_tokens["never"])

    sessions = [f"s{i}" for i in range(10)]
    # The sessions' ids fall in distinct registers of the sessions' sketch (usage.sketches),
    # so its count of the replaced ones is exact, not an estimate.
    assert len({sketch_position(s)[0] for s in sessions}) == len(sessions)

    def traffic(i: int) -> None:
        messages: list[Any] = [{"role": "user", "content": " ".join(["word"] * (1 + i % 13))}]
        headers = {}
        if i % 10 < 3:  # sessions s0..s9 at turns 1..3
            messages = conversation(1 + i % 10)
            headers["X-Session-Id"] = sessions[i // 10]
        try:
            if i % 4 == 0:
                stream = client.chat.completions.create(
                    model=EXP_ROUTE,
                    messages=messages,
                    stream=True,
                    stream_options={"include_usage": True},
                    extra_headers=headers,
                )
                list(stream)
            else:
                client.chat.completions.create(
                    model=EXP_ROUTE, messages=messages, extra_headers=headers
                )
        except openai.BadRequestError:
            pass  # a scripted 400: a failed request of its arm

    requests = 100
    with ThreadPoolExecutor(6) as pool:
        list(pool.map(traffic, range(requests)))
    # Two target failures that fall back to model-a (replaced requests, two attempts each).
    live_gateway.upstream.script({"keys": {SECRET_B: {"queue": [{"fault": "500"}] * 2}}})
    fallbacks = 0
    while fallbacks < 2:
        raw = client.chat.completions.with_raw_response.create(model=EXP_ROUTE, messages=PROMPT)
        fallbacks += raw.headers.get(FALLBACK_HEADER) == "true"
        requests += 1
        assert requests < 200, "no fallback came"
    # Opt-outs: three by header, one by body field, two by token.
    for _ in range(3):
        client.chat.completions.create(
            model=EXP_ROUTE, messages=PROMPT, extra_headers={"X-LLMRotate-No-Replace": "1"}
        )
    client.chat.completions.create(
        model=EXP_ROUTE, messages=PROMPT, extra_body={"llmrotate_no_replace": True}
    )
    for _ in range(2):
        never.chat.completions.create(model=EXP_ROUTE, messages=PROMPT)
    requests += 6

    def written() -> list[Any] | None:
        assert get_recorder().flush(timeout=10)
        rows = list(CallRecord.objects.all())
        return rows if sum(r.final for r in rows) == requests else None

    rows = wait_for(written, timeout=20, message=f"{requests} requests recorded")
    want = expected_metrics(rows, "metrics")
    # The traffic is what the comparison needs: both arms, failures, tools, streams, costs.
    assert want["replaced"] + want["control"] == requests - 6
    assert want["opt_outs"] == {"header": 4, "token": 2}
    for arm in (want["replaced_arm"], want["control_arm"]):
        assert arm["requests"] > arm["successes"] > 0, arm
        assert arm["tool_calls"] > 0 and arm["ttft_ms"] and arm["cost_usd"] > 0, arm
    assert want["sessions_replaced"] > 0 and want["first_replacement_turns"]
    assert want["replaced_arm"]["answered_by"][f"{PROVIDER}/{MODEL_A}"] >= 2  # the fallbacks

    monitor = {"Authorization": f"Bearer {report.generated_tokens['watcher']}"}
    stamp = since.isoformat().replace("+00:00", "Z")
    with httpx.Client(base_url=live_gateway.base_url, headers=monitor, timeout=20) as http:
        ours = http.get("/api/replacement/metrics", params={"since": stamp})
        assert ours.status_code == 200, ours.text
        assert_rule_metrics(ours.json(), rows, "metrics")
        lip = http.get("/v1/replacement/metrics", params={"start_date": stamp})
        assert lip.status_code == 200, lip.text
        assert_rule_metrics(lip.json(), rows, "metrics")
        # One rule asked for by name, none for a route without rules; the proxy token is refused.
        other = http.get("/api/replacement/metrics", params={"since": stamp, "route": "other"})
        assert other.status_code == 200 and other.json()["rules"] == []
        one = http.get("/v1/replacement/metrics", params={"start_date": stamp, "rule": "metrics"})
        assert [r["rule"] for r in one.json()["rules"]] == ["metrics"]
        refused = http.get(
            "/v1/replacement/metrics", headers={"Authorization": f"Bearer {live_gateway.token}"}
        )
        assert refused.status_code in (401, 403)
