"""Limits in the config file: the `limits` section and the keys' provider limits, imported,
exported and refused with their path."""

from __future__ import annotations

import copy
import io
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml
from django.core.management import call_command
from django.utils import timezone

from keys.config_io import ConfigError, config_export, config_import
from keys.config_schema import config_json_schema
from keys.models import LIMIT_FIELDS, ApiKey, ClientToken, Limit, Provider
from tests.factories import ClientTokenFactory, RouteFactory
from tests.keys.test_config_import import document as base_document

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY_1", "sk-proj-abcdefghijklmnop0001")
    monkeypatch.setenv("LLMROTATE_CI_TOKEN", "ci-token-from-the-environment-0001")


def document() -> dict[str, Any]:
    data = base_document()
    data["keys"][0].update(requests_per_minute=500, tokens_per_minute=200_000)
    data["limits"] = [
        {"client": "ci", "requests_per_minute": 60, "usd_per_day": "5.00", "usd_per_month": 100},
        {"route": "gpt-4o-mini", "tokens_per_minute": 100_000, "max_concurrent": 20},
        {
            "client": "dashboard",
            "route": "gpt-4o-mini",
            "requests_per_day": 1000,
            "tokens_per_day": 2_000_000,
            "usd_per_day": 0.25,
        },
    ]
    return data


def limits() -> dict[tuple[str | None, str | None], dict[str, Any]]:
    """Every Limit row by scope, with the limits it sets."""
    fields = LIMIT_FIELDS
    rows = Limit.objects.select_related("client", "route")
    return {
        (
            row.client.name if row.client else None,
            row.route.name if row.route else None,
        ): {f: getattr(row, f) for f in fields if getattr(row, f) is not None}
        for row in rows
    }


def errors_of(data: Any) -> list[str]:
    with pytest.raises(ConfigError) as excinfo:
        config_import(data=data)
    assert not Provider.objects.exists(), "nothing is written when the file has errors"
    return excinfo.value.errors


def test_it_creates_limits_for_each_scope_and_the_keys_provider_limits() -> None:
    report = config_import(data=document())

    assert report.counts["limits"].created == 3
    assert limits() == {
        ("ci", None): {
            "requests_per_minute": 60,
            "usd_per_day": Decimal("5"),
            "usd_per_month": Decimal("100"),
        },
        (None, "gpt-4o-mini"): {"tokens_per_minute": 100_000, "max_concurrent": 20},
        ("dashboard", "gpt-4o-mini"): {
            "requests_per_day": 1000,
            "tokens_per_day": 2_000_000,
            "usd_per_day": Decimal("0.25"),
        },
    }
    key = ApiKey.objects.get(key_id="openai-1")
    assert (key.requests_per_minute, key.tokens_per_minute) == (500, 200_000)
    other = ApiKey.objects.get(key_id="local-1")
    assert (other.requests_per_minute, other.tokens_per_minute) == (None, None)


def test_a_second_run_changes_no_limit() -> None:
    config_import(data=document())
    before = {row.pk: row.updated_at for row in Limit.objects.all()}

    report = config_import(data=document())

    assert (report.created, report.updated) == (0, 0)
    assert report.counts["limits"].unchanged == 3
    assert {row.pk: row.updated_at for row in Limit.objects.all()} == before


def test_limits_are_updated_by_scope_null_removes_one_and_left_out_fields_are_kept() -> None:
    config_import(data=document())
    data = document()
    data["limits"] = [{"client": "ci", "requests_per_minute": 120, "usd_per_day": None}]
    data["keys"][0] = {"id": "openai-1", "provider": "openai", "tokens_per_minute": None}

    report = config_import(data=data)

    assert (report.counts["limits"].updated, report.counts["keys"].updated) == (1, 1)
    assert limits()[("ci", None)] == {
        "requests_per_minute": 120,
        "usd_per_month": Decimal("100"),
    }
    # The limits the file no longer mentions are left alone, like every other row.
    assert len(limits()) == 3
    key = ApiKey.objects.get(key_id="openai-1")
    assert (key.requests_per_minute, key.tokens_per_minute) == (500, None)


def test_a_limit_may_refer_to_a_client_and_a_route_already_in_the_database() -> None:
    ClientTokenFactory(name="batch")
    RouteFactory(name="claude")

    report = config_import(data={"limits": [{"client": "batch", "route": "claude"}]})

    assert report.counts["limits"].created == 1
    assert set(limits()) == {("batch", "claude")}


def test_a_dry_run_reports_limits_and_saves_none() -> None:
    report = config_import(data=document(), dry_run=True)

    assert report.counts["limits"].created == 3
    assert "limits: 3 created, 0 updated, 0 unchanged" in report.summary()
    assert not Limit.objects.exists()
    assert not ClientToken.objects.exists()


def test_a_dry_run_reports_the_errors_of_limits_too() -> None:
    data = document()
    data["limits"][0]["client"] = "nobody"

    with pytest.raises(ConfigError) as excinfo:
        config_import(data=data, dry_run=True)

    assert excinfo.value.errors == ["limits[0].client: unknown client 'nobody'"]


def test_export_writes_limits_that_import_again_unchanged_here_and_elsewhere() -> None:
    config_import(data=document())
    out = io.StringIO()

    call_command("export_config", stdout=out, stderr=io.StringIO())

    exported = yaml.safe_load(out.getvalue())
    assert exported["limits"] == [
        {"route": "gpt-4o-mini", "tokens_per_minute": 100_000, "max_concurrent": 20},
        {
            "client": "ci",
            "requests_per_minute": 60,
            "usd_per_day": "5.00",
            "usd_per_month": "100.00",
        },
        {
            "client": "dashboard",
            "route": "gpt-4o-mini",
            "requests_per_day": 1000,
            "tokens_per_day": 2_000_000,
            "usd_per_day": "0.25",
        },
    ]
    keys = {k["id"]: k for k in exported["keys"]}
    assert (keys["openai-1"]["requests_per_minute"], keys["openai-1"]["tokens_per_minute"]) == (
        500,
        200_000,
    )
    assert "requests_per_minute" not in keys["local-1"]

    report = config_import(data=copy.deepcopy(exported))
    assert (report.created, report.updated) == (0, 0)
    assert config_export() == exported

    # Into an empty database (the encrypted key needs its secret back, as for any export).
    before = limits()
    for model in (Limit, ApiKey, ClientToken, Provider):
        model.objects.all().delete()
    keys["local-1"]["secret"] = "literal://ollama-does-not-check"
    config_import(data=copy.deepcopy(exported))
    assert limits() == before
    assert config_export()["limits"] == exported["limits"]


def test_export_as_json_keeps_amounts_exact() -> None:
    config_import(data={**document(), "limits": [{"client": "ci", "usd_per_month": "0.0001"}]})
    out = io.StringIO()

    call_command("export_config", format="json", stdout=out, stderr=io.StringIO())

    exported = json.loads(out.getvalue())
    assert exported["limits"] == [{"client": "ci", "usd_per_month": "0.0001"}]
    assert config_import(data=exported).counts["limits"].unchanged == 1


def test_limits_of_revoked_clients_are_not_exported() -> None:
    config_import(data=document())
    ClientToken.objects.filter(name="dashboard").update(revoked_at=timezone.now())

    exported = config_export()

    assert [(e.get("client"), e.get("route")) for e in exported["limits"]] == [
        (None, "gpt-4o-mini"),
        ("ci", None),
    ]
    # The export stays importable: it names no client it leaves out.
    assert config_import(data=exported, dry_run=True).counts["limits"].unchanged == 2


# Each change to the example document, and the one error it must give, in full. First what
# only import_config can check (names and scopes against the file and the database), then the
# types the schema checks too, then what the schema lets through.
REFUSED_BY_NAME = [
    (
        lambda d: d["limits"][0].update(client="nobody"),
        "limits[0].client: unknown client 'nobody'",
    ),
    (
        lambda d: d["limits"][1].update(route="gpt-5"),
        "limits[1].route: unknown route 'gpt-5'",
    ),
    (
        lambda d: d["limits"].append({"requests_per_minute": 5}),
        "limits[3]: a limit needs a client, a route, or both",
    ),
    (
        lambda d: d["limits"].append({"client": "ci", "max_concurrent": 2}),
        "limits[3]: duplicate limit for client 'ci' on any route (also limits[0])",
    ),
    (
        lambda d: d["limits"].append({"route": "gpt-4o-mini", "client": "dashboard"}),
        "limits[3]: duplicate limit for client 'dashboard' on route 'gpt-4o-mini' (also limits[2])",
    ),
]
REFUSED = [
    (
        lambda d: d["limits"][0].update(requests_per_minute=0),
        "limits[0].requests_per_minute: must be at least 1",
    ),
    (
        lambda d: d["limits"][1].update(max_concurrent=-3),
        "limits[1].max_concurrent: must be at least 1",
    ),
    (
        lambda d: d["limits"][2].update(tokens_per_day="1000"),
        "limits[2].tokens_per_day: expected an integer, got a string",
    ),
    (
        lambda d: d["limits"][0].update(usd_per_day=-1),
        "limits[0].usd_per_day: must be at least 0",
    ),
    (
        lambda d: d["limits"][0].update(usd_per_day="-0.50"),
        "limits[0].usd_per_day: must be at least 0",
    ),
    (
        lambda d: d["limits"][0].update(usd_per_month=True),
        "limits[0].usd_per_month: expected a number or a decimal string, got a boolean",
    ),
    (
        lambda d: d["limits"][0].update(usd_per_month=100_000_000),
        "limits[0].usd_per_month: must be less than 100000000",
    ),
    (
        lambda d: d["limits"][0].update(rpm=60),
        "limits[0].rpm: unknown field; expected one of client, max_concurrent, "
        "requests_per_day, requests_per_minute, route, tokens_per_day, tokens_per_minute, "
        "usd_per_day, usd_per_month",
    ),
    (lambda d: d.update(limits={"ci": {}}), "limits: expected a list, got a mapping"),
    (
        lambda d: d["keys"][0].update(requests_per_minute=0),
        "keys[0].requests_per_minute: must be at least 1",
    ),
    (
        lambda d: d["keys"][1].update(tokens_per_minute="1000"),
        "keys[1].tokens_per_minute: expected an integer, got a string",
    ),
]
REFUSED_BY_IMPORT_ONLY = [
    (
        lambda d: d["limits"][0].update(usd_per_day="5 dollars"),
        "limits[0].usd_per_day: expected an amount such as 12.50 or '12.50', got '5 dollars'",
    ),
    (
        lambda d: d["limits"][0].update(usd_per_day=0.00001),
        "limits[0].usd_per_day: at most 4 decimal places",
    ),
    (
        lambda d: d["limits"][0].update(usd_per_day=float("nan")),
        "limits[0].usd_per_day: expected an amount such as 12.50 or '12.50', got nan",
    ),
    (
        lambda d: d["limits"][0].update(client=" "),
        "limits[0].client: expected a non-empty string",
    ),
]


@pytest.mark.parametrize(("change", "error"), REFUSED_BY_NAME + REFUSED + REFUSED_BY_IMPORT_ONLY)
def test_it_refuses_with_the_path_and_in_words(change: Any, error: str) -> None:
    data = document()
    change(data)

    assert errors_of(data) == [error]


@pytest.mark.parametrize(("change", "error"), REFUSED)
def test_the_schema_refuses_what_the_types_refuse(change: Any, error: str) -> None:
    jsonschema_rs = pytest.importorskip("jsonschema_rs")
    data = document()
    change(data)

    assert not jsonschema_rs.validator_for(json.loads(config_json_schema())).is_valid(data), error


def test_the_schema_accepts_the_limits_import_accepts_and_exports() -> None:
    jsonschema_rs = pytest.importorskip("jsonschema_rs")
    validator = jsonschema_rs.validator_for(json.loads(config_json_schema()))
    assert validator.is_valid(document())
    config_import(data=document())

    assert validator.is_valid(json.loads(json.dumps(config_export())))


def test_every_error_of_the_limits_is_reported_at_once_after_the_other_sections() -> None:
    data = document()
    data["limits"][0].update(client="nobody", requests_per_minute=0)
    data["limits"].append({"route": "gpt-4o-mini"})
    data["keys"][0]["weight"] = 0

    assert errors_of(data) == [
        "keys[0].weight: must be at least 1",
        "limits[0].client: unknown client 'nobody'",
        "limits[0].requests_per_minute: must be at least 1",
        "limits[3]: duplicate limit for any client on route 'gpt-4o-mini' (also limits[1])",
    ]


def test_the_documented_example_is_valid() -> None:
    docs = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
    section = docs.read_text(encoding="utf-8").split("## Limits and budgets", 1)[1]
    example = yaml.safe_load(section.split("```yaml\n", 1)[1].split("```", 1)[0])
    data = {**base_document(), **example}
    jsonschema_rs = pytest.importorskip("jsonschema_rs")

    assert jsonschema_rs.validator_for(json.loads(config_json_schema())).is_valid(data)
    report = config_import(data=data, dry_run=True)
    assert (report.counts["keys"].created, report.counts["limits"].created) == (1, 3)
