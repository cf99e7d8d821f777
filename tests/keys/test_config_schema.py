"""The config file's format: what import_config refuses, with which words, and the published
JSON Schema (docs/config.schema.json) that editors validate with."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from django.core.management import call_command

from keys.config_io import ConfigError, config_import
from keys.config_schema import config_json_schema
from keys.models import Provider
from tests.keys.test_config_import import document

pytestmark = pytest.mark.django_db

SCHEMA_FILE = Path(__file__).resolve().parents[2] / "docs" / "config.schema.json"
REGENERATE = ".venv/bin/python manage.py export_config --schema > docs/config.schema.json"


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY_1", "sk-proj-abcdefghijklmnop0001")
    monkeypatch.setenv("LLMROTATE_CI_TOKEN", "ci-token-from-the-environment-0001")


def errors_of(data: Any) -> list[str]:
    with pytest.raises(ConfigError) as excinfo:
        config_import(data=data)
    assert not Provider.objects.exists()
    return excinfo.value.errors


# Each change to the example document, and the one error it must give, in full.
REFUSED = [
    (
        lambda d: d["keys"][0].update(priority=True),
        "keys[0].priority: expected an integer, got a boolean",
    ),
    (
        lambda d: d["keys"][0].update(priority="1"),
        "keys[0].priority: expected an integer, got a string",
    ),
    (lambda d: d["keys"][0].update(priority=2**31), "keys[0].priority: must be at most 2147483647"),
    (lambda d: d["keys"][0].update(weight=0), "keys[0].weight: must be at least 1"),
    (
        lambda d: d["providers"]["openai"].update(cooldown_seconds=-1),
        "providers.openai.cooldown_seconds: must be at least 0",
    ),
    (
        lambda d: d["providers"]["openai"].update(quarantine_seconds="300"),
        "providers.openai.quarantine_seconds: expected an integer, got a string",
    ),
    (
        lambda d: d["providers"]["openai"].update(enabled=1),
        "providers.openai.enabled: expected true or false, got a number",
    ),
    (
        lambda d: d["providers"]["openai"].update(kind=1),
        "providers.openai.kind: unknown value 1; expected one of anthropic, openai, "
        "openai_compatible",
    ),
    (
        lambda d: d["providers"]["openai"].update(timeout=5),
        "providers.openai.timeout: unknown field; expected one of base_url, cooldown_seconds, "
        "enabled, exhausted_seconds, kind, quarantine_seconds, requires_key",
    ),
    (lambda d: d["keys"][0].update(id=""), "keys[0].id: expected a non-empty string"),
    (
        lambda d: d["keys"][0].update(models=["gpt-4o-mini", 4]),
        "keys[0].models[1]: expected a non-empty string, got a number",
    ),
    (
        lambda d: d["keys"][0].update(secret=None),
        "keys[0].secret: expected a non-empty string, got nothing",
    ),
    (
        lambda d: d["routes"]["gpt-4o-mini"]["deployments"][0].update(model=4),
        "routes.gpt-4o-mini.deployments[0].model: expected a non-empty string, got a number",
    ),
    (
        lambda d: d["routes"]["gpt-4o-mini"]["deployments"][1].update(weight=2),
        "routes.gpt-4o-mini.deployments[1].weight: unknown field; expected one of model, provider",
    ),
    (
        lambda d: d["routes"]["gpt-4o-mini"]["deployments"][0].pop("model"),
        "routes.gpt-4o-mini.deployments[0].model: required",
    ),
    (
        lambda d: d["routes"]["gpt-4o-mini"].update(strategy=None),
        "routes.gpt-4o-mini.strategy: unknown value None; expected one of health_aware, "
        "least_busy, priority, round_robin, weighted",
    ),
    (
        lambda d: d["clients"][0].update(scope=["proxy"]),
        "clients[0].scope: unknown field; expected one of expires_at, name, never_replace,"
        " routes, scopes, token",
    ),
    (
        lambda d: d["clients"][0].update(scopes=[1]),
        "clients[0].scopes[0]: unknown value 1; expected one of monitor, proxy",
    ),
    (
        lambda d: d["clients"][0].update(routes="*"),
        "clients[0].routes: expected a list, got a string",
    ),
    (
        lambda d: d["clients"][1].update(token=None),
        "clients[1].token: expected a non-empty string, got nothing",
    ),
    (
        lambda d: d["clients"][1].update(token=12345678901234567890),
        "clients[1].token: expected a non-empty string, got a number",
    ),
    (lambda d: d.update(version=True), "version: unsupported version True; expected 1"),
    (lambda d: d.update(keys={}), "keys: expected a list, got a mapping"),
]
# The schema has no word for these: a blank string, 1.0 (an integer to JSON Schema), a YAML
# mapping key that is a number.
REFUSED_BY_IMPORT_ONLY = [
    (
        lambda d: d["keys"][0].update(priority=1.0),
        "keys[0].priority: expected an integer, got a number",
    ),
    (lambda d: d["keys"][0].update(id=" "), "keys[0].id: expected a non-empty string"),
    (
        lambda d: d["providers"].update({1: {"base_url": "https://api.example.com/v1"}}),
        "providers.1: expected a non-empty string, got a number",
    ),
]


@pytest.mark.parametrize(("change", "error"), REFUSED + REFUSED_BY_IMPORT_ONLY)
def test_it_refuses_with_the_path_and_in_words(change: Any, error: str) -> None:
    data = document()
    change(data)

    assert errors_of(data) == [error]


def test_duplicates_are_reported_with_every_other_error_in_the_order_of_sections() -> None:
    data = document()
    data["clients"][1]["name"] = "ci"
    data["keys"][0]["weight"] = 0
    data["keys"][1].update(id="openai-1", provider="nope")
    data["extra"] = 1

    assert errors_of(data) == [
        "extra: unknown section; expected one of version, providers, keys, routes, clients, limits,"
        " capture, replacement",
        "keys[0].weight: must be at least 1",
        "keys[1].provider: unknown provider 'nope'",
        "keys[1].id: duplicate id 'openai-1' (also keys[0])",
        "clients[1].name: duplicate name 'ci' (also clients[0])",
    ]


def test_a_provider_in_error_does_not_make_its_keys_unknown() -> None:
    data = document()
    del data["providers"]["local"]["base_url"]

    assert errors_of(data) == ["providers.local.base_url: required"]


def test_empty_sections_are_no_sections() -> None:
    report = config_import(
        data=yaml.safe_load("version: 1\nproviders:\nkeys:\nroutes:\nclients:\n")
    )

    assert report.created == 0


def test_the_published_schema_is_the_one_the_models_generate() -> None:
    assert SCHEMA_FILE.read_text(encoding="utf-8") == config_json_schema(), (
        f"docs/config.schema.json is out of date; regenerate it: {REGENERATE}"
    )


def test_export_config_schema_writes_it() -> None:
    out = io.StringIO()

    call_command("export_config", schema=True, stdout=out)

    assert out.getvalue() == config_json_schema()


def test_what_import_config_accepts_and_exports_the_schema_accepts() -> None:
    jsonschema_rs = pytest.importorskip("jsonschema_rs")
    validator = jsonschema_rs.validator_for(json.loads(config_json_schema()))
    assert validator.is_valid(document())
    config_import(data=document())
    out = io.StringIO()

    call_command("export_config", format="json", stdout=out, stderr=io.StringIO())

    assert validator.is_valid(json.loads(out.getvalue()))


@pytest.mark.parametrize(("change", "error"), REFUSED)
def test_the_schema_refuses_what_the_types_refuse(change: Any, error: str) -> None:
    jsonschema_rs = pytest.importorskip("jsonschema_rs")
    validator = jsonschema_rs.validator_for(json.loads(config_json_schema()))
    data = document()
    change(data)

    assert not validator.is_valid(data), error


def test_the_readme_example_is_valid() -> None:
    readme = (SCHEMA_FILE.parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## The config file (a public contract)", 1)[1]
    example = yaml.safe_load(section.split("```yaml\n", 1)[1].split("```", 1)[0])
    jsonschema_rs = pytest.importorskip("jsonschema_rs")

    assert jsonschema_rs.validator_for(json.loads(config_json_schema())).is_valid(example)
    assert config_import(data=example, dry_run=True).created == 4
