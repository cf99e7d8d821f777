"""Replacement rules and clients' `never_replace` in the config file: imported, exported, round
tripped, and refused with their path."""

from __future__ import annotations

import copy
import io
import json
import textwrap
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from django.core.management import call_command

from keys import config_io
from keys.config_io import ConfigError, config_export, config_import
from keys.config_schema import config_json_schema
from keys.models import ClientToken, Provider, ReplacementRule, Route
from keys.routing import routing_snapshot_sync

pytestmark = pytest.mark.django_db

CI_TOKEN = "ci-token-from-the-environment-0001"


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMROTATE_CI_TOKEN", CI_TOKEN)
    monkeypatch.setenv("OPENAI_API_KEY_1", "sk-proj-abcdefghijklmnop0001")


def document() -> dict[str, Any]:
    return {
        "providers": {
            "openai": {"kind": "openai", "base_url": "https://api.openai.com/v1"},
            # Keyless: a target deployment needs a key (or none needed) to run.
            "local": {
                "kind": "openai_compatible",
                "base_url": "http://127.0.0.1:11434/v1",
                "requires_key": False,
            },
        },
        "routes": {
            "gpt-4o-mini": {"deployments": [{"provider": "openai", "model": "gpt-4o-mini"}]},
            "gpt-4o": {"deployments": [{"provider": "openai", "model": "gpt-4o"}]},
            "llama": {"deployments": [{"provider": "local", "model": "llama3.2"}]},
            "ollama/*": {"deployments": [{"provider": "local", "model": "*"}]},
        },
        "clients": [
            {"name": "ci", "token": "env://LLMROTATE_CI_TOKEN"},
            {"name": "evals", "never_replace": True},
        ],
        "replacement": [
            {
                "name": "mini-to-llama",
                "route": "gpt-4o-mini",
                "target": {"provider": "local", "model": "llama3.2"},
                "probability": 0.25,
                "stickiness": "per_session",
                "sticky_turns": 20,
                "min_turn": 3,
                "clients": ["ci"],
                "without_tools": True,
                "without_images": True,
                "active_from": "2026-12-01T00:00:00Z",
                "active_until": "2026-12-15T12:00:00+02:00",
                "seed": "winter",
                "enabled": False,
                "position": 2,
            },
            {"name": "4o-to-llama-route", "route": "gpt-4o", "target": {"route": "llama"}},
        ],
    }


def rules() -> dict[str, ReplacementRule]:
    return {
        r.name: r
        for r in ReplacementRule.objects.select_related("route", "target_provider", "target_route")
    }


def errors_of(data: Any) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        config_import(data=data)
    assert not Provider.objects.exists(), "nothing is written when the file has errors"
    return caught.value.errors


def with_rule(**changes: Any) -> dict[str, Any]:
    """The document with its first rule changed (a value of None: that field left out)."""
    data = document()
    rule = data["replacement"][0]
    for name, value in changes.items():
        if value is None:
            rule.pop(name, None)
        else:
            rule[name] = value
    return data


def test_it_creates_rules_with_every_field_and_clients_opt_out() -> None:
    report = config_import(data=document())

    assert report.counts["replacement"].created == 2
    found = rules()
    full = found["mini-to-llama"]
    assert full.route.name == "gpt-4o-mini"
    assert full.target_provider is not None and full.target_provider.name == "local"
    assert (full.target_model, full.target_route) == ("llama3.2", None)
    assert (full.probability, full.stickiness) == (0.25, "per_session")
    assert (full.sticky_turns, full.min_turn, full.clients) == (20, 3, ["ci"])
    assert (full.without_tools, full.without_images) == (True, True)
    assert full.active_from == datetime(2026, 12, 1, tzinfo=UTC)
    assert full.active_until == datetime(2026, 12, 15, 10, tzinfo=UTC)
    assert (full.seed, full.enabled, full.position) == ("winter", False, 2)
    # Left out of a new rule: the model's defaults.
    short = found["4o-to-llama-route"]
    assert short.target_route is not None and short.target_route.name == "llama"
    assert (short.target_provider, short.target_model) == (None, "")
    defaults = ReplacementRule()
    for name in ("probability", "stickiness", "sticky_turns", "min_turn", "clients", "seed"):
        assert getattr(short, name) == getattr(defaults, name), name
    assert (short.enabled, short.position, short.active_from) == (True, 0, None)
    tokens = {c.name: c.never_replace for c in ClientToken.objects.all()}
    assert tokens == {"ci": False, "evals": True}


def test_imported_rules_reach_the_routing_snapshot() -> None:
    routing_snapshot_sync()  # cached before the import, which must drop it
    config_import(data=document())

    specs = routing_snapshot_sync().replacements
    assert [s.name for s in specs["gpt-4o"]] == ["4o-to-llama-route"]
    assert [d.model for d in specs["gpt-4o"][0].deployments] == ["llama3.2"]
    assert "gpt-4o-mini" not in specs, "a disabled rule is not routed"


def test_a_second_run_changes_nothing() -> None:
    config_import(data=document())
    before = {r.pk: r.updated_at for r in ReplacementRule.objects.all()}

    report = config_import(data=document())

    assert (report.created, report.updated) == (0, 0)
    assert report.counts["replacement"].unchanged == 2
    assert report.counts["clients"].unchanged == 2
    assert {r.pk: r.updated_at for r in ReplacementRule.objects.all()} == before


def test_rules_are_updated_by_name_and_left_out_fields_keep_their_value() -> None:
    config_import(data=document())
    data = document()
    data["replacement"] = [
        {
            "name": "mini-to-llama",
            "route": "gpt-4o-mini",
            "target": {"route": "llama"},
            "probability": 1,
            "active_until": None,
        },
        {"name": "4o-to-llama-route", "route": "gpt-4o", "target": {"route": "llama"}},
    ]
    data["clients"] = [{"name": "evals", "never_replace": False}]

    report = config_import(data=data)

    assert (report.counts["replacement"].updated, report.counts["replacement"].unchanged) == (1, 1)
    rule = rules()["mini-to-llama"]
    # The new target replaces the old one whole: no provider is left behind.
    assert rule.target_route is not None and rule.target_route.name == "llama"
    assert (rule.target_provider, rule.target_model) == (None, "")
    assert (rule.probability, rule.active_until) == (1.0, None)
    assert rule.active_from == datetime(2026, 12, 1, tzinfo=UTC)
    assert (rule.stickiness, rule.clients, rule.seed, rule.position) == (
        "per_session",
        ["ci"],
        "winter",
        2,
    )
    assert ClientToken.objects.get(name="evals").never_replace is False
    assert report.counts["clients"].updated == 1


def test_nothing_is_deleted_and_a_client_left_out_keeps_its_opt_out() -> None:
    config_import(data=document())
    data = document()
    data["replacement"] = []
    data["clients"] = [{"name": "evals", "routes": ["gpt-4o"]}]

    config_import(data=data)

    assert set(rules()) == {"mini-to-llama", "4o-to-llama-route"}
    evals = ClientToken.objects.get(name="evals")
    assert (evals.routes, evals.never_replace) == (["gpt-4o"], True)


def test_export_writes_every_rule_and_reimporting_it_changes_nothing() -> None:
    config_import(data=document())
    out = io.StringIO()

    call_command("export_config", stdout=out, stderr=io.StringIO())

    exported = yaml.safe_load(out.getvalue())
    assert exported["replacement"] == [
        {
            "name": "4o-to-llama-route",
            "route": "gpt-4o",
            "target": {"route": "llama"},
            "probability": 0.1,
            "stickiness": "per_request",
            "sticky_turns": 10,
            "min_turn": 0,
            "clients": [],
            "without_tools": False,
            "without_images": False,
            "active_from": None,
            "active_until": None,
            "seed": "",
            "enabled": True,
            "position": 0,
        },
        {
            "name": "mini-to-llama",
            "route": "gpt-4o-mini",
            "target": {"provider": "local", "model": "llama3.2"},
            "probability": 0.25,
            "stickiness": "per_session",
            "sticky_turns": 20,
            "min_turn": 3,
            "clients": ["ci"],
            "without_tools": True,
            "without_images": True,
            "active_from": "2026-12-01T00:00:00Z",
            "active_until": "2026-12-15T10:00:00Z",
            "seed": "winter",
            "enabled": False,
            "position": 2,
        },
    ]
    assert {c["name"]: c["never_replace"] for c in exported["clients"]} == {
        "ci": False,
        "evals": True,
    }
    before = {r.pk: r.updated_at for r in ReplacementRule.objects.all()}

    report = config_import(data=copy.deepcopy(exported))

    assert (report.created, report.updated) == (0, 0)
    assert report.counts["replacement"].unchanged == 2
    assert {r.pk: r.updated_at for r in ReplacementRule.objects.all()} == before
    assert config_export() == exported


def test_the_export_imports_into_an_empty_database_and_the_schema_accepts_it() -> None:
    jsonschema_rs = pytest.importorskip("jsonschema_rs")
    validator = jsonschema_rs.validator_for(json.loads(config_json_schema()))
    assert validator.is_valid(document())
    config_import(data=document())
    out = io.StringIO()
    call_command("export_config", format="json", stdout=out, stderr=io.StringIO())
    exported = json.loads(out.getvalue())
    assert validator.is_valid(exported)

    for model in (ReplacementRule, ClientToken, Route, Provider):
        model.objects.all().delete()
    config_import(data=copy.deepcopy(exported))

    assert config_export()["replacement"] == exported["replacement"]
    assert ClientToken.objects.get(name="evals").never_replace is True


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (
            {"route": "no-such-route"},
            "replacement[0].route: unknown route 'no-such-route'",
        ),
        (
            {"target": {"provider": "nobody", "model": "x"}},
            "replacement[0].target.provider: unknown provider 'nobody'",
        ),
        (
            {"target": {"route": "no-such-route"}},
            "replacement[0].target.route: unknown route 'no-such-route'",
        ),
        (
            {"target": {"route": "gpt-4o-mini"}},
            "replacement[0].target.route: 'gpt-4o-mini' is the rule's own route: a rule cannot "
            "point at its own route",
        ),
        (
            {"target": {"route": "ollama/*"}},
            "replacement[0].target.route: must be an exact route, not a pattern (a name with '*')",
        ),
        (
            {"target": {"provider": "local", "model": "llama3.2", "route": "llama"}},
            "replacement[0].target: either {provider, model} or {route}, not both",
        ),
        (
            {"target": {"model": "llama3.2", "route": "llama"}},
            "replacement[0].target: either {provider, model} or {route}, not both",
        ),
        ({"target": {}}, "replacement[0].target: expected {provider, model} or {route}"),
        (
            {"target": {"provider": "local"}},
            "replacement[0].target: a provider needs the model to send it: {provider, model}",
        ),
        (
            {"target": {"model": "llama3.2"}},
            "replacement[0].target: a model needs its provider: {provider, model}",
        ),
        (
            {"target": {"route": None}},
            "replacement[0].target: route: expected a non-empty string, got nothing",
        ),
        (
            {"target": {"provider": "local", "model": "llama*"}},
            "replacement[0].target.model: a replacement's model is a plain model name, without '*'",
        ),
        ({"target": None}, "replacement[0].target: required"),
        ({"route": None}, "replacement[0].route: required"),
        ({"probability": 1.5}, "replacement[0].probability: must be at most 1"),
        ({"probability": -0.1}, "replacement[0].probability: must be at least 0"),
        ({"probability": "0.5"}, "replacement[0].probability: expected a number, got a string"),
        (
            {"clients": ["ci", "nobody"]},
            "replacement[0].clients[1]: unknown client 'nobody'",
        ),
        (
            {"active_from": "2026-12-01T00:00:00"},
            "replacement[0].active_from: expected a time with a time zone, such as "
            "'2026-12-07T12:00:00Z'",
        ),
        (
            {"active_until": "2026-12-15T12:00:00"},
            "replacement[0].active_until: expected a time with a time zone, such as "
            "'2026-12-07T12:00:00Z'",
        ),
        (
            {"active_until": "2026-11-30T23:00:00Z"},
            "replacement[0].active_until: the window ends before it starts (active_from)",
        ),
        (
            {"active_until": "2026-12-01T00:00:00Z"},
            "replacement[0].active_until: the window ends before it starts (active_from)",
        ),
        (
            {"stickiness": "forever"},
            "replacement[0].stickiness: unknown value 'forever'; expected one of per_request, "
            "per_session",
        ),
        ({"sticky_turns": 0}, "replacement[0].sticky_turns: must be at least 1"),
        ({"min_turn": -1}, "replacement[0].min_turn: must be at least 0"),
        ({"name": "no spaces"}, "replacement[0].name: "),
        (
            {"surprise": 1},
            "replacement[0].surprise: unknown field; expected one of active_from, "
            "active_until, clients, enabled, min_turn, name, position, probability, route, "
            "seed, stickiness, sticky_turns, target, without_images, without_tools",
        ),
    ],
    ids=lambda value: json.dumps(value) if isinstance(value, dict) else "",
)
def test_a_bad_rule_is_refused_with_its_path(change: dict[str, Any], error: str) -> None:
    errors = errors_of(with_rule(**change))

    assert len(errors) == 1, errors
    assert errors[0].startswith(error), errors
    assert not ReplacementRule.objects.exists()


def test_two_rules_with_one_name_are_refused() -> None:
    data = document()
    data["replacement"][1]["name"] = "mini-to-llama"

    assert errors_of(data) == [
        "replacement[1].name: duplicate name 'mini-to-llama' (also replacement[0])"
    ]


def test_a_window_that_ends_before_the_stored_start_is_refused_on_update() -> None:
    # The file's own fields agree; with the stored start they do not.
    config_import(data=document())
    data = document()
    data["replacement"] = [
        {
            "name": "mini-to-llama",
            "route": "gpt-4o-mini",
            "target": {"provider": "local", "model": "llama3.2"},
            "active_until": "2026-11-01T00:00:00Z",
        }
    ]

    with pytest.raises(ConfigError) as caught:
        config_import(data=data)

    assert caught.value.errors == ["replacement[0].active_until: The window ends before it starts."]
    assert rules()["mini-to-llama"].active_until == datetime(2026, 12, 15, 10, tzinfo=UTC)


def test_rules_may_name_routes_providers_and_clients_already_in_the_database() -> None:
    config_import(data=document())

    report = config_import(
        data={
            "replacement": [
                {
                    "name": "later",
                    "route": "llama",
                    "target": {"provider": "openai", "model": "gpt-4o-mini"},
                    "clients": ["evals"],
                }
            ]
        }
    )

    assert report.counts["replacement"].created == 1
    assert rules()["later"].target_label == "openai/gpt-4o-mini"


def test_never_replace_must_be_a_boolean() -> None:
    data = document()
    data["clients"][1]["never_replace"] = "yes"

    assert errors_of(data) == ["clients[1].never_replace: expected true or false, got a string"]


def test_the_documented_examples_are_valid() -> None:
    jsonschema_rs = pytest.importorskip("jsonschema_rs")
    validator = jsonschema_rs.validator_for(json.loads(config_json_schema()))
    docs = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
    section = docs.read_text(encoding="utf-8").split("## Model replacement experiments", 1)[1]
    example = yaml.safe_load(section.split("```yaml\n", 1)[1].split("```", 1)[0])
    base = document()
    base["routes"]["gpt-4.1"] = {"deployments": [{"provider": "openai", "model": "gpt-4.1"}]}
    data = {**base, **example, "clients": base["clients"][:1] + example["clients"]}
    # The module's own example, as its docstring shows it.
    module = textwrap.dedent(config_io.__doc__.split("An example:\n", 1)[1].split("\nRules,")[0])
    module_example = yaml.safe_load(module)

    for doc in (data, module_example):
        assert validator.is_valid(doc)
        report = config_import(data=doc, dry_run=True)
        assert report.counts["replacement"].created == len(doc["replacement"])
    assert not ReplacementRule.objects.exists()
