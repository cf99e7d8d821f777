"""The replacement draw, stickiness, conditions and opt-outs, on an in-memory snapshot (no
database): proxy.replacement.replacement_assign and keys.replacement."""

from __future__ import annotations

import math
import uuid
from typing import Any

import pytest

from common.errors import ApiError
from keys.health import KeyPolicy
from keys.replacement import (
    NEVER,
    ReplacementSpec,
    replacement_draw,
    session_first_turn,
    unit_interval,
)
from keys.routing import (
    DeploymentInfo,
    ProviderInfo,
    RouteInfo,
    RoutingSnapshot,
    TokenInfo,
    UpstreamKey,
)
from proxy.callers import Caller
from proxy.replacement import OPT_OUT_FIELD, Assignment, replacement_assign

NOW = 1_800_000_000.0


def _deployment(model: str, *, replacement: str = "") -> DeploymentInfo:
    key = UpstreamKey("k1", "p", "sk-test", "sk-…", 0, 1, frozenset())
    provider = ProviderInfo("p", "openai", "http://127.0.0.1:9", KeyPolicy(), (key,))
    return DeploymentInfo(
        position=100_000 if replacement else 0,
        provider=provider,
        model=model,
        keys=(key,),
        replacement=replacement,
    )


ROUTE = RouteInfo(name="big", strategy="health_aware", created=0, deployments=(_deployment("big"),))


def spec(name: str = "r", **overrides: Any) -> ReplacementSpec:
    fields: dict[str, Any] = {
        "name": name,
        "seed": name,
        "probability": 1.0,
        "per_session": False,
        "sticky_turns": 3,
        "min_turn": 0,
        "clients": frozenset(),
        "without_tools": False,
        "without_images": False,
        "active_from": None,
        "active_until": None,
        "target": "p/small",
        "deployments": (_deployment("small", replacement=name),),
    }
    return ReplacementSpec(**(fields | overrides))


def token(name: str = "app", *, never_replace: bool = False) -> TokenInfo:
    return TokenInfo(1, name, "h", frozenset({"*"}), frozenset({"proxy"}), False, never_replace)


def assign(
    *specs: ReplacementSpec,
    body: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    caller: Caller | None = None,
    client: TokenInfo | None = None,
    request_id: str = "req-1",
    now: float = NOW,
) -> tuple[RouteInfo, Assignment | None]:
    snapshot = RoutingSnapshot(replacements={"big": specs} if specs else {})
    return replacement_assign(
        snapshot,
        ROUTE,
        client=client or token(),
        caller=caller or Caller(),
        body=body if body is not None else {"model": "big", "messages": []},
        headers=headers or {},
        request_id=request_id,
        now=now,
    )


# --- the draw ----------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9])
def test_draw_replaces_the_configured_share_within_binomial_tolerance(p: float) -> None:
    n = 10_000
    hits = sum(replacement_draw("seed", f"req-{i}") < p for i in range(n))
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(hits - n * p) < 4 * sigma, (hits, n * p)


def test_draw_is_deterministic_per_request_id_and_seed() -> None:
    ids = [uuid.uuid4().hex for _ in range(200)]
    first = [replacement_draw("s1", i) for i in ids]
    assert first == [replacement_draw("s1", i) for i in ids]
    assert first != [replacement_draw("s2", i) for i in ids]  # the seed changes the draw
    assert all(0.0 <= u < 1.0 for u in first)


def test_the_largest_hash_still_draws_below_one() -> None:
    # 64 bits over 2**64 would round up to 1.0 here, and log1p(-1.0) is undefined.
    assert unit_interval(b"\xff" * 8) < 1.0
    assert unit_interval(b"\x00" * 8) == 0.0


def test_a_tiny_probability_never_replaces_a_session_rather_than_overflowing() -> None:
    for p in (5e-324, 1e-300, 1e-17):
        assert session_first_turn("s", "session", probability=p, min_turn=1) == NEVER


def test_the_same_request_id_gets_the_same_assignment_every_time() -> None:
    rule = spec(probability=0.5)
    answers = {
        rid: assign(rule, request_id=rid)[1] for rid in (uuid.uuid4().hex for _ in range(100))
    }
    for rid, answer in answers.items():
        assert assign(rule, request_id=rid)[1] == answer
    assert {a.arm for a in answers.values() if a} == {"replaced", "control"}


# --- what a replaced request does ---------------------------------------------------------


def test_a_replaced_request_tries_the_target_first_then_the_route_own_deployments() -> None:
    route, assignment = assign(spec())
    assert assignment == Assignment("r", "replaced")
    assert [d.model for d in route.deployments] == ["small", "big"]
    assert [d.replacement for d in route.deployments] == ["r", ""]
    assert route.name == ROUTE.name and route.config_name == ROUTE.config_name


def test_a_control_request_keeps_its_route() -> None:
    route, assignment = assign(spec(probability=0.0))
    assert assignment == Assignment("r", "control")
    assert route is ROUTE


def test_a_route_without_rules_is_not_an_experiment() -> None:
    route, assignment = assign()
    assert assignment is None and route is ROUTE


def test_a_rule_whose_target_has_no_deployment_does_not_run() -> None:
    assert assign(spec(deployments=()))[1] is None


def test_the_first_rule_whose_conditions_match_takes_the_request() -> None:
    narrow = spec("narrow", clients=frozenset({"other"}))
    broad = spec("broad", probability=0.0)
    assert assign(narrow, broad)[1] == Assignment("broad", "control")
    assert assign(narrow, broad, client=token("other"))[1] == Assignment("narrow", "replaced")


# --- conditions --------------------------------------------------------------------------


def test_min_turn_condition() -> None:
    rule = spec(min_turn=3)
    assert assign(rule, caller=Caller(turn=2))[1] is None
    assert assign(rule, caller=Caller(turn=3))[1] == Assignment("r", "replaced")


def test_clients_condition() -> None:
    rule = spec(clients=frozenset({"ci"}))
    assert assign(rule, client=token("app"))[1] is None
    assert assign(rule, client=token("ci"))[1] is not None


def test_without_tools_condition() -> None:
    rule = spec(without_tools=True)
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert assign(rule, body={"model": "big", "messages": [], "tools": tools})[1] is None
    assert assign(rule, body={"model": "big", "messages": [], "tools": []})[1] is not None


@pytest.mark.parametrize(
    "part",
    [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}},
    ],
)
def test_without_images_condition(part: dict[str, Any]) -> None:
    rule = spec(without_images=True)
    messages = [{"role": "user", "content": [{"type": "text", "text": "hi"}, part]}]
    assert assign(rule, body={"model": "big", "messages": messages})[1] is None
    text_only = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert assign(rule, body={"model": "big", "messages": text_only})[1] is not None


def test_without_images_sees_images_nested_in_tool_results() -> None:
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "A"}}
    result = {"type": "tool_result", "tool_use_id": "t1", "content": [image]}
    messages = [{"role": "user", "content": [result]}]
    assert assign(spec(without_images=True), body={"model": "big", "messages": messages})[1] is None


def test_time_window_condition() -> None:
    rule = spec(active_from=NOW - 10, active_until=NOW + 10)
    assert assign(rule, now=NOW)[1] is not None
    assert assign(rule, now=NOW - 11)[1] is None
    assert assign(rule, now=NOW + 10)[1] is None  # the end is exclusive


# --- opt-outs ----------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["1", "true", "TRUE", " yes "])
def test_opt_out_header_keeps_the_route_and_is_counted(value: str) -> None:
    route, assignment = assign(spec(), headers={"x-llmrotate-no-replace": value})
    assert assignment == Assignment("r", "opt_out_header")
    assert route is ROUTE


def test_opt_out_header_zero_does_not_opt_out() -> None:
    assert assign(spec(), headers={"x-llmrotate-no-replace": "0"})[1] == Assignment("r", "replaced")


def test_opt_out_body_field_is_honoured_and_never_forwarded() -> None:
    body = {"model": "big", "messages": [], OPT_OUT_FIELD: True}
    assert assign(spec(), body=body)[1] == Assignment("r", "opt_out_header")
    assert OPT_OUT_FIELD not in body


def test_opt_out_body_field_is_removed_on_a_route_without_rules() -> None:
    body = {"model": "big", "messages": [], OPT_OUT_FIELD: False}
    assign(body=body)
    assert OPT_OUT_FIELD not in body


def test_opt_out_by_token() -> None:
    route, assignment = assign(spec(), client=token(never_replace=True))
    assert assignment == Assignment("r", "opt_out_token")
    assert route is ROUTE


def test_a_malformed_opt_out_is_refused_on_a_route_without_rules_too() -> None:
    with pytest.raises(ApiError) as header:
        assign(headers={"x-llmrotate-no-replace": "please"})
    assert header.value.status == 400


def test_a_malformed_opt_out_is_a_400_naming_it() -> None:
    with pytest.raises(ApiError) as header:
        assign(spec(), headers={"x-llmrotate-no-replace": "please"})
    assert header.value.status == 400 and header.value.param == "x-llmrotate-no-replace"
    with pytest.raises(ApiError) as field:
        assign(spec(), body={"model": "big", OPT_OUT_FIELD: "yes"})
    assert field.value.status == 400 and field.value.param == OPT_OUT_FIELD


# --- per-session stickiness --------------------------------------------------------------


def _session_turns(rule: ReplacementSpec, session: str, turns: range) -> list[int]:
    replaced = []
    for turn in turns:
        answer = assign(
            rule,
            caller=Caller(session_id=session, turn=turn),
            request_id=uuid.uuid4().hex,  # per session, the request id does not matter
        )[1]
        assert (answer is None) == (turn < rule.min_turn)  # not eligible before min_turn
        if answer is not None and answer.arm == "replaced":
            replaced.append(turn)
    return replaced


def test_per_session_replaces_a_contiguous_run_of_at_most_k_turns_then_returns() -> None:
    rule = spec(probability=0.3, per_session=True, sticky_turns=4, min_turn=2)
    replaced_sessions = 0
    for i in range(300):
        turns = _session_turns(rule, f"s{i}", range(1, 60))
        if not turns:
            continue
        replaced_sessions += 1
        first = turns[0]
        assert first >= 2
        assert turns == list(range(first, min(first + 4, 60)))
    assert replaced_sessions > 250  # 1 - 0.7^58: almost every session is replaced once


def test_per_session_marks_the_turn_that_starts_the_replacement() -> None:
    rule = spec(probability=1.0, per_session=True, sticky_turns=3, min_turn=2)
    arms = [
        assign(rule, caller=Caller(session_id="s", turn=t), request_id=f"r{t}")[1]
        for t in range(1, 7)
    ]
    assert [a.arm if a else None for a in arms] == [
        None,  # turn 1: before min_turn
        "replaced",
        "replaced",
        "replaced",
        "control",  # the sticky window is over: back for good
        "control",
    ]
    assert [a.start if a else None for a in arms] == [None, True, False, False, False, False]


def test_per_session_first_turn_is_geometric_with_the_rule_probability() -> None:
    p, n = 0.25, 10_000
    firsts = [session_first_turn("seed", f"s{i}", probability=p, min_turn=1) for i in range(n)]
    at_first = sum(f == 1 for f in firsts)
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(at_first - n * p) < 4 * sigma
    mean = sum(firsts) / n
    assert abs(mean - 1 / p) < 0.15  # E[first turn] = 1/p from turn 1


def test_per_session_without_a_session_id_draws_per_request() -> None:
    rule = spec(probability=0.5, per_session=True)
    arms = {
        assign(rule, caller=Caller(turn=1), request_id=f"r{i}")[1].arm  # type: ignore[union-attr]
        for i in range(100)
    }
    assert arms == {"replaced", "control"}
