from __future__ import annotations

import copy
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from django.core.management import call_command
from django.db import connections

from keys.config_io import ConfigError, config_export, config_import
from keys.crypto import hash_token
from keys.management.commands.import_config import Command as ImportCommand
from keys.models import ApiKey, ClientToken, Provider, Route
from keys.secrets import api_key_resolve_secret
from keys.services import client_token_lookup_prefix
from tests.factories import ApiKeyFactory, ProviderFactory

pytestmark = pytest.mark.django_db

OPENAI_SECRET = "sk-proj-abcdefghijklmnop0001"
CI_TOKEN = "ci-token-from-the-environment-0001"


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY_1", OPENAI_SECRET)
    monkeypatch.setenv("LLMROTATE_CI_TOKEN", CI_TOKEN)


def document() -> dict[str, Any]:
    return {
        "providers": {
            "openai": {
                "kind": "openai",
                "base_url": "https://api.openai.com/v1",
                "cooldown_seconds": 30,
                "quarantine_seconds": 300,
                "exhausted_seconds": 3600,
                "enabled": True,
            },
            "local": {"kind": "openai_compatible", "base_url": "http://127.0.0.1:11434/v1"},
        },
        "keys": [
            {
                "id": "openai-1",
                "provider": "openai",
                "secret": "env://OPENAI_API_KEY_1",
                "priority": 0,
                "weight": 1,
                "models": ["gpt-4o-mini"],
                "enabled": True,
            },
            {"id": "local-1", "provider": "local", "secret": "literal://ollama-does-not-check"},
        ],
        "routes": {
            "gpt-4o-mini": {
                "strategy": "health_aware",
                "deployments": [
                    {"provider": "openai", "model": "gpt-4o-mini"},
                    {"provider": "local", "model": "llama3.2"},
                ],
            }
        },
        "clients": [
            {
                "name": "ci",
                "token": "env://LLMROTATE_CI_TOKEN",
                "routes": ["*"],
                "scopes": ["proxy", "monitor"],
            },
            {"name": "dashboard", "scopes": ["monitor"]},
        ],
    }


def errors_of(data: Any) -> list[str]:
    with pytest.raises(ConfigError) as excinfo:
        config_import(data=data)
    return excinfo.value.errors


def test_it_creates_everything() -> None:
    report = config_import(data=document())

    assert {s: c.created for s, c in report.counts.items()} == {
        "providers": 2,
        "keys": 2,
        "routes": 1,
        "clients": 2,
        "limits": 0,
        "capture": 0,
        "replacement": 0,
    }
    key = ApiKey.objects.get(key_id="openai-1")
    assert key.provider.name == "openai"
    assert key.allowed_models == ["gpt-4o-mini"]
    assert api_key_resolve_secret(api_key=key) == OPENAI_SECRET
    route = Route.objects.get(name="gpt-4o-mini")
    assert [(d.provider.name, d.model) for d in route.deployments.all()] == [
        ("openai", "gpt-4o-mini"),
        ("local", "llama3.2"),
    ]
    ci = ClientToken.objects.get(name="ci")
    assert ci.scopes == ["proxy", "monitor"]
    assert ci.token_hash == hash_token(CI_TOKEN)
    assert ci.prefix == client_token_lookup_prefix(CI_TOKEN)


def test_a_second_run_changes_nothing() -> None:
    config_import(data=document())
    before = {k.key_id: (k.secret_encrypted, k.updated_at) for k in ApiKey.objects.all()}

    report = config_import(data=document())

    assert (report.created, report.updated) == (0, 0)
    assert report.unchanged == 7
    assert report.generated_tokens == {}
    # Not even re-encrypted: the ciphertext of the literal key is the same bytes.
    assert {k.key_id: (k.secret_encrypted, k.updated_at) for k in ApiKey.objects.all()} == before


def test_it_updates_by_name() -> None:
    config_import(data=document())
    data = document()
    data["providers"]["openai"]["cooldown_seconds"] = 60
    data["keys"][0]["weight"] = 5
    data["routes"]["gpt-4o-mini"]["deployments"].reverse()
    data["clients"][0]["scopes"] = ["proxy"]

    report = config_import(data=data)

    assert {s: c.updated for s, c in report.counts.items()} == {
        "providers": 1,
        "keys": 1,
        "routes": 1,
        "clients": 1,
        "limits": 0,
        "capture": 0,
        "replacement": 0,
    }
    assert Provider.objects.get(name="openai").cooldown_seconds == 60
    assert ApiKey.objects.get(key_id="openai-1").weight == 5
    route = Route.objects.get(name="gpt-4o-mini")
    assert [d.provider.name for d in route.deployments.all()] == ["local", "openai"]
    assert ClientToken.objects.get(name="ci").scopes == ["proxy"]
    assert ApiKey.objects.count() == 2


def test_fields_left_out_keep_their_value_and_rows_left_out_are_kept() -> None:
    config_import(data=document())
    ApiKey.objects.filter(key_id="openai-1").update(priority=7)
    ApiKeyFactory(key_id="made-in-admin", provider=Provider.objects.get(name="openai"))

    report = config_import(data={"keys": [{"id": "openai-1", "provider": "openai", "weight": 1}]})

    assert report.counts["keys"].unchanged == 1
    assert ApiKey.objects.get(key_id="openai-1").priority == 7
    assert ApiKey.objects.filter(key_id="made-in-admin").exists()
    assert Route.objects.filter(name="gpt-4o-mini").exists()


def test_a_changed_secret_is_an_update() -> None:
    config_import(data=document())
    data = document()
    data["keys"][1]["secret"] = "literal://ollama-still-does-not-check"

    report = config_import(data=data)

    assert report.counts["keys"].updated == 1
    key = ApiKey.objects.get(key_id="local-1")
    assert api_key_resolve_secret(api_key=key) == "ollama-still-does-not-check"


def test_an_env_key_is_not_stored_in_the_database() -> None:
    config_import(data=document())

    row = ApiKey.objects.values().get(key_id="openai-1")
    assert row["secret_ref"] == "env://OPENAI_API_KEY_1"
    assert row["secret_encrypted"] == ""
    assert row["secret_hint"] == "sk-proj-…0001"
    assert OPENAI_SECRET not in str(row)


def test_literal_and_raw_secrets_warn() -> None:
    data = document()
    data["keys"].append({"id": "openai-2", "provider": "openai", "secret": "sk-raw-0123456789abc"})

    report = config_import(data=data)

    warned = [w.split(":")[0] for w in report.warnings]
    assert warned == ["keys[1].secret", "keys[2].secret"]
    assert all("sk-raw-0123456789abc" not in w for w in report.warnings)


def test_an_unresolvable_key_reference_is_only_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY_1")

    report = config_import(data=document())

    assert any(w.startswith("keys[0].secret: env://OPENAI_API_KEY_1") for w in report.warnings)
    assert ApiKey.objects.get(key_id="openai-1").secret_ref == "env://OPENAI_API_KEY_1"


def test_an_unresolvable_client_token_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLMROTATE_CI_TOKEN")

    assert errors_of(document()) == [
        "clients[0].token: environment variable LLMROTATE_CI_TOKEN is not set "
        "(referenced as env://LLMROTATE_CI_TOKEN)"
    ]
    assert not Provider.objects.exists()


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (
            lambda d: d["keys"][1].update(provider="foo"),
            "keys[1].provider: unknown provider 'foo'",
        ),
        (lambda d: d["keys"][0].update(colour="red"), "keys[0].colour: unknown field"),
        (lambda d: d.update(extras={}), "extras: unknown section"),
        (lambda d: d["keys"][0].pop("id"), "keys[0].id: required"),
        (lambda d: d["keys"][0].update(weight=0), "keys[0].weight: must be at least 1"),
        (lambda d: d["keys"][0].update(weight=True), "keys[0].weight: expected an integer"),
        (lambda d: d["keys"][0].update(models="gpt-4o"), "keys[0].models: expected a list"),
        (
            lambda d: d["keys"][0].update(secret="vault://x"),
            "keys[0].secret: unknown secret scheme",
        ),
        (lambda d: d["keys"][1].update(id="openai-1"), "keys[1].id: duplicate id 'openai-1'"),
        (
            lambda d: d["providers"]["openai"].update(base_url="not a url"),
            "providers.openai.base_url: Enter a valid URL.",
        ),
        (lambda d: d["providers"]["local"].update(kind="bard"), "providers.local.kind: unknown"),
        (lambda d: d["providers"]["local"].pop("base_url"), "providers.local.base_url: required"),
        (
            lambda d: d["routes"]["gpt-4o-mini"]["deployments"][1].update(provider="azure"),
            "routes.gpt-4o-mini.deployments[1].provider: unknown provider 'azure'",
        ),
        (
            lambda d: d["routes"]["gpt-4o-mini"].update(strategy="fastest"),
            "routes.gpt-4o-mini.strategy: unknown value 'fastest'",
        ),
        (
            lambda d: d["routes"]["gpt-4o-mini"].update(deployments=[]),
            "routes.gpt-4o-mini.deployments: expected a non-empty list",
        ),
        (lambda d: d["clients"][1].update(scopes=["admin"]), "clients[1].scopes[0]: unknown"),
        (lambda d: d["clients"][1].update(token="literal://short"), "clients[1].token: a client"),
        (
            lambda d: d["clients"][1].update(token="env://LLMROTATE_CI_TOKEN"),
            "clients[1].token: same token as clients[0]",
        ),
        (lambda d: d.update(version=2), "version: unsupported version 2"),
        (lambda d: d.update(keys={"id": "x"}), "keys: expected a list, got a mapping"),
    ],
)
def test_it_reports_errors_with_their_path(change: Any, error: str) -> None:
    data = document()
    change(data)

    errors = errors_of(data)

    assert any(e.startswith(error) for e in errors), errors
    assert not Provider.objects.exists()


def test_it_reports_every_error_at_once() -> None:
    data = document()
    data["keys"][0]["weight"] = -1
    data["clients"][1]["scopes"] = ["root"]

    assert [e.split(":")[0] for e in errors_of(data)] == ["keys[0].weight", "clients[1].scopes[0]"]


def test_a_new_key_needs_a_secret() -> None:
    data = document()
    del data["keys"][0]["secret"]

    assert errors_of(data) == ["keys[0].secret: required for a new key"]
    assert not Provider.objects.exists()


def test_a_key_may_refer_to_a_provider_already_in_the_database() -> None:
    ProviderFactory(name="anthropic", kind=Provider.Kind.ANTHROPIC)

    report = config_import(
        data={
            "keys": [
                {"id": "claude-1", "provider": "anthropic", "secret": "env://OPENAI_API_KEY_1"}
            ]
        }
    )

    assert report.counts["keys"].created == 1


def test_a_dry_run_saves_nothing() -> None:
    report = config_import(data=document(), dry_run=True)

    assert report.created == 7
    assert report.generated_tokens == {}
    assert not Provider.objects.exists()
    assert not ClientToken.objects.exists()


def test_a_generated_token_is_printed_once_and_works(tmp_path: Path) -> None:
    path = tmp_path / "llmrotate.yaml"
    path.write_text(yaml.safe_dump(document()))
    out = io.StringIO()

    call_command("import_config", str(path), stdout=out, stderr=io.StringIO())

    printed = re.findall(r"dashboard: (llmr_\S+)", out.getvalue())
    assert len(printed) == 1
    assert "shown only this once" in out.getvalue()
    client = ClientToken.objects.get(name="dashboard")
    assert client.token_hash == hash_token(printed[0])
    assert client.prefix == client_token_lookup_prefix(printed[0])

    again = io.StringIO()
    call_command("import_config", str(path), stdout=again, stderr=io.StringIO())
    assert "llmr_" not in again.getvalue()
    assert ClientToken.objects.get(name="dashboard").token_hash == hash_token(printed[0])


def test_the_command_reads_json_and_exits_non_zero_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = document()
    data["keys"][1]["provider"] = "foo"
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    # run_from_argv closes connections when done, which would end the test's transaction.
    monkeypatch.setattr(connections, "close_all", lambda: None)

    with pytest.raises(SystemExit) as excinfo:
        ImportCommand().run_from_argv(["manage.py", "import_config", str(path)])

    err = capsys.readouterr().err
    assert excinfo.value.code == 1
    assert "keys[1].provider: unknown provider 'foo'" in err
    assert "Traceback" not in err


def test_the_command_rejects_a_file_that_is_not_yaml(tmp_path: Path) -> None:
    from django.core.management.base import CommandError

    path = tmp_path / "config.yaml"
    path.write_text("providers: [unclosed\n")

    with pytest.raises(CommandError, match="not valid yaml"):
        call_command("import_config", str(path), stdout=io.StringIO())


def test_export_round_trips_without_secrets(tmp_path: Path) -> None:
    config_import(data=document())
    literal = ApiKey.objects.get(key_id="local-1")
    out = tmp_path / "export.yaml"

    call_command("export_config", output=str(out), stderr=io.StringIO())

    text = out.read_text()
    assert "ollama-does-not-check" not in text
    assert literal.secret_encrypted not in text
    assert OPENAI_SECRET not in text and CI_TOKEN not in text
    assert "local-1" in text.split("They are:")[1].splitlines()[0]
    exported = yaml.safe_load(text)
    keys = {k["id"]: k for k in exported["keys"]}
    assert keys["openai-1"]["secret"] == "env://OPENAI_API_KEY_1"
    assert "secret" not in keys["local-1"]
    assert all("token" not in c for c in exported["clients"])

    report = config_import(data=copy.deepcopy(exported))

    assert (report.created, report.updated, report.unchanged) == (0, 0, 7)
    assert config_export() == exported


def test_export_as_json_is_importable() -> None:
    config_import(data=document())
    out = io.StringIO()

    call_command("export_config", format="json", stdout=out, stderr=io.StringIO())

    assert config_import(data=json.loads(out.getvalue())).unchanged == 7
