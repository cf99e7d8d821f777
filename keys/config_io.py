"""Import and export of providers, keys, routes, clients, limits, capture rules and replacement
rules as one YAML/JSON document.

The format is a public contract: keys.config_schema describes it (and publishes it as
docs/config.schema.json). An example:

    version: 1                      # optional; the only version so far
    providers:
      openai: {kind: openai, base_url: "https://api.openai.com/v1", cooldown_seconds: 30}
      local: {kind: openai_compatible, base_url: "http://127.0.0.1:11434/v1", requires_key: false}
    keys:
      - {id: openai-1, provider: openai, secret: "env://OPENAI_API_KEY_1", models: [gpt-4o-mini]}
    routes:
      gpt-4o-mini:
        strategy: health_aware
        deployments: [{provider: openai, model: gpt-4o-mini}]
    clients:
      - {name: ci, token: "env://LLMROTATE_CI_TOKEN", routes: ["*"], scopes: [proxy, monitor]}
      - {name: evals, routes: ["*"], never_replace: true}   # never in an experiment
    limits:
      - {client: ci, requests_per_minute: 60, usd_per_day: "5.00"}
      - {route: gpt-4o-mini, tokens_per_minute: 200000, max_concurrent: 20}
    capture:
      - {client: ci, sample_rate: 0.1, until: "2026-12-07T12:00:00Z"}
    replacement:                    # model replacement experiments (docs/replacement.md)
      - name: mini-to-llama
        route: gpt-4o-mini
        target: {provider: local, model: llama3.2}    # or {route: another-route}
        probability: 0.1
        stickiness: per_session     # or per_request
        sticky_turns: 20
        min_turn: 3
        clients: [ci]
        without_tools: true
        active_from: "2026-12-01T00:00:00Z"
        active_until: "2026-12-15T00:00:00Z"

Rules, chosen so that the same file can be applied again and again (GitOps, container start):

- Everything is matched by name (provider name, key `id`, route name, client `name`,
  replacement rule `name`; a limit or a capture rule by its `client` and `route`) and created
  or updated. Re-importing an unchanged file changes nothing.
- Fields left out of an entry keep their current value (model defaults on create), so a
  hand-written file can be short and a change made in the admin survives. Required everywhere:
  a provider's `base_url`, a key's `provider`, a route's `deployments`, a replacement rule's
  `route` and `target`. A key's `secret` is required only when the key is created.
- A route's deployments are replaced, in the order given; so is a replacement rule's `target`,
  whole (`{provider, model}` or `{route}`).
- A limit field written as `null` removes that limit; left out, it keeps its current value.
- Rows in the database that the file does not mention are left alone; nothing is deleted.
- Secrets: `env://NAME` and `file://path` are stored as references and never enter the
  database; `literal://value` and a bare value are stored encrypted, with a warning.
- A client's `token` is optional. Left out for a new client, one is generated and returned in
  the report, to be shown once; left out for an existing client, its token is kept. Given (best
  as `env://…`), it is resolved now and only its hash is stored.
- Unknown sections and fields are errors; all errors are reported together, each with its path
  (`keys[2].provider: unknown provider 'foo'`), and nothing is written unless all is valid.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Q

from keys.config_schema import (
    CONFIG_VERSION,
    SECTIONS,
    CaptureConfig,
    ClientConfig,
    ConfigError,
    KeyConfig,
    LimitConfig,
    ProviderConfig,
    ReplacementConfig,
    RouteConfig,
    client_token,
    config_parse,
)
from keys.crypto import SecretDecryptionError, hash_token
from keys.models import (
    LIMIT_FIELDS,
    ApiKey,
    CaptureRule,
    ClientToken,
    Deployment,
    Limit,
    Provider,
    ReplacementRule,
    Route,
    validate_pattern_model,
)
from keys.services import (
    SecretSpec,
    api_key_save,
    api_key_secret_matches,
    client_token_create,
    client_token_update,
    invalidate_routing_on_commit,
)
from keys.strategies import DEFAULT_STRATEGY


@dataclass
class SectionCounts:
    created: int = 0
    updated: int = 0
    unchanged: int = 0


@dataclass
class ImportReport:
    dry_run: bool = False
    counts: dict[str, SectionCounts] = field(
        default_factory=lambda: {section: SectionCounts() for section in SECTIONS}
    )
    warnings: list[str] = field(default_factory=list)
    # Client name → generated token. Print once; only its hash is stored.
    generated_tokens: dict[str, str] = field(default_factory=dict)

    @property
    def created(self) -> int:
        return sum(c.created for c in self.counts.values())

    @property
    def updated(self) -> int:
        return sum(c.updated for c in self.counts.values())

    @property
    def unchanged(self) -> int:
        return sum(c.unchanged for c in self.counts.values())

    def summary(self) -> list[str]:
        lines = [
            f"{section}: {c.created} created, {c.updated} updated, {c.unchanged} unchanged"
            for section, c in self.counts.items()
        ]
        if self.dry_run:
            lines.append("Dry run: nothing was saved.")
        return lines


# ---------------------------------------------------------------------------------------------
# Applying


class _Rollback(Exception):
    """Leaves the atomic block of a dry run, undoing everything."""


@contextmanager
def _collect(errors: list[str], path: str, field_names: dict[str, str]) -> Iterator[None]:
    """Turn a model or service ValidationError into an error at `path`."""
    try:
        yield
    except ValidationError as exc:
        if hasattr(exc, "error_dict"):
            for name, messages in exc.message_dict.items():
                where = path if name == "__all__" else f"{path}.{field_names.get(name, name)}"
                errors.extend(f"{where}: {m}" for m in messages)
        else:
            errors.extend(f"{path}: {m}" for m in exc.messages)


def _diff(instance: Any, values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if getattr(instance, k) != v}


def _upsert(
    existing: Any,
    model: type[Any],
    identity: dict[str, Any],
    values: dict[str, Any],
    counts: SectionCounts,
) -> None:
    """Create the entry (`existing` None: `model(**identity, **values)`), or update what
    differs; validated either way."""
    if existing is None:
        instance = model(**identity, **values)
        counts.created += 1
    else:
        changes = _diff(existing, values)
        if not changes:
            counts.unchanged += 1
            return
        for field_name, value in changes.items():
            setattr(existing, field_name, value)
        instance = existing
        counts.updated += 1
    instance.full_clean()
    instance.save()


def config_import(*, data: Any, dry_run: bool = False) -> ImportReport:
    """Create or update everything the document describes, in one transaction.

    Raises ConfigError (nothing written) when the document or any entry is invalid.
    """
    report = ImportReport(dry_run=dry_run)
    errors: list[str] = []
    try:
        with transaction.atomic():
            # Parsed inside the transaction: provider names are checked against the same
            # snapshot the writes go to.
            doc, warnings = config_parse(data=data)
            report.warnings.extend(warnings)
            providers = _apply_providers(doc.providers or {}, report, errors)
            if errors:
                # Keys and routes below would refer to providers that were not saved.
                raise ConfigError(errors)
            _apply_keys(doc.keys or [], providers, report, errors)
            _apply_routes(doc.routes or {}, providers, report, errors)
            _apply_clients(doc.clients or [], report, errors)
            _apply_limits(doc.limits or [], report, errors)
            _apply_capture(doc.capture or [], report, errors)
            _apply_replacement(doc.replacement or [], providers, report, errors)
            if errors:
                raise ConfigError(errors)
            if dry_run:
                # Tokens generated in a dry run are rolled back with everything else.
                report.generated_tokens.clear()
                raise _Rollback
    except _Rollback:
        pass
    else:
        invalidate_routing_on_commit()
    return report


def _apply_providers(
    entries: dict[str, ProviderConfig], report: ImportReport, errors: list[str]
) -> dict[str, Provider]:
    counts = report.counts["providers"]
    for name, entry in entries.items():
        provider = Provider.objects.filter(name=name).first()
        values = entry.model_dump(exclude_unset=True)
        with _collect(errors, f"providers.{name}", {}):
            _upsert(provider, Provider, {"name": name}, values, counts)
    return {p.name: p for p in Provider.objects.all()}


_KEY_FIELD_NAMES = {"key_id": "id", "allowed_models": "models"}


def _apply_keys(
    entries: list[KeyConfig],
    providers: dict[str, Provider],
    report: ImportReport,
    errors: list[str],
) -> None:
    counts = report.counts["keys"]
    for i, entry in enumerate(entries):
        path = f"keys[{i}]"
        key = ApiKey.objects.select_related("provider").filter(key_id=entry.id).first()
        provider = providers[entry.provider]
        spec = entry.secret
        with _collect(errors, path, _KEY_FIELD_NAMES):
            if key is None:
                if spec is None:
                    errors.append(f"{path}.secret: required for a new key")
                    continue
                key = ApiKey(key_id=entry.id, provider=provider, **entry.values())
                key.full_clean(exclude=["secret_encrypted", "secret_ref", "secret_hint"])
                # The service's own warnings repeat what parsing reported, without the path.
                api_key_save(api_key=key, secret=_secret_text(spec))
                counts.created += 1
                continue
            changes = _diff(key, {**entry.values(), "provider_id": provider.pk})
            new_secret = None
            if spec is not None and not _secret_unchanged(key, spec, path, report):
                new_secret = _secret_text(spec)
            if not changes and new_secret is None:
                counts.unchanged += 1
                continue
            for name, value in changes.items():
                setattr(key, name, value)
            key.full_clean(exclude=["secret_encrypted", "secret_ref", "secret_hint"])
            api_key_save(api_key=key, secret=new_secret)
            counts.updated += 1


def _secret_text(spec: SecretSpec) -> str:
    # Re-wrap so that a literal that happens to look like a reference stays a literal.
    return spec.value if spec.kind == "reference" else f"literal://{spec.value}"


def _secret_unchanged(key: ApiKey, spec: SecretSpec, path: str, report: ImportReport) -> bool:
    try:
        return api_key_secret_matches(api_key=key, spec=spec)
    except SecretDecryptionError:
        # The stored ciphertext is unreadable with today's keys; the file's secret replaces it,
        # which is also how an operator repairs a lost encryption key.
        report.warnings.append(f"{path}.secret: the stored secret could not be decrypted; replaced")
        return False


def _apply_routes(
    entries: dict[str, RouteConfig],
    providers: dict[str, Provider],
    report: ImportReport,
    errors: list[str],
) -> None:
    counts = report.counts["routes"]
    for name, entry in entries.items():
        route = Route.objects.filter(name=name).first()
        values = entry.model_dump(exclude_unset=True, exclude={"deployments"})
        deployments = [(d.provider, d.model) for d in entry.deployments]
        with _collect(errors, f"routes.{name}", {}):
            created = route is None
            current: list[tuple[str, str]] = []
            if route is None:
                route = Route(name=name, **{"strategy": DEFAULT_STRATEGY, **values})
            else:
                changes = _diff(route, values)
                for field_name, value in changes.items():
                    setattr(route, field_name, value)
                current = [
                    (d.provider.name, d.model)
                    for d in route.deployments.select_related("provider").order_by("position")
                ]
                if not changes and current == deployments:
                    counts.unchanged += 1
                    continue
            for _, model in deployments:
                validate_pattern_model(name, model)
            route.full_clean()
            route.save()
            if current != deployments:
                # Replaced rather than patched: positions are unique per route, and the file's
                # order is the fallback order.
                route.deployments.all().delete()
                Deployment.objects.bulk_create(
                    Deployment(route=route, position=i, provider=providers[p], model=m)
                    for i, (p, m) in enumerate(deployments)
                )
            if created:
                counts.created += 1
            else:
                counts.updated += 1


def _apply_clients(entries: list[ClientConfig], report: ImportReport, errors: list[str]) -> None:
    counts = report.counts["clients"]
    for i, entry in enumerate(entries):
        path = f"clients[{i}]"
        client = ClientToken.objects.filter(name=entry.name).first()
        token = None if entry.token is None else client_token(entry.token)
        with _collect(errors, path, {}):
            if client is None:
                # The models' defaults (all routes, proxy only) for what the file leaves out.
                client, created_token = client_token_create(
                    name=entry.name,
                    routes=entry.routes,
                    scopes=entry.scopes,
                    token=token,
                    never_replace=entry.never_replace,
                    expires_at=entry.expires_at,
                )
                if token is None:
                    report.generated_tokens[entry.name] = created_token
                counts.created += 1
                continue
            if client.revoked_at is not None:
                report.warnings.append(
                    f"{path}: client '{entry.name}' is revoked; importing does not reinstate it"
                )
            given = entry.model_fields_set
            routes = entry.routes if "routes" in given else client.routes
            scopes = entry.scopes if "scopes" in given else client.scopes
            never_replace = client.never_replace
            if "never_replace" in given:
                never_replace = entry.never_replace
            expires_at = entry.expires_at if "expires_at" in given else client.expires_at
            if token is not None and hmac.compare_digest(hash_token(token), client.token_hash):
                token = None
            if (
                routes == client.routes
                and scopes == client.scopes
                and never_replace == client.never_replace
                and expires_at == client.expires_at
                and token is None
            ):
                counts.unchanged += 1
                continue
            client_token_update(
                client_token=client,
                routes=routes,
                scopes=scopes,
                token=token,
                never_replace=never_replace,
                expires_at=expires_at,
            )
            counts.updated += 1


def _apply_limits(entries: list[LimitConfig], report: ImportReport, errors: list[str]) -> None:
    _apply_scoped(entries, Limit, "limits", report, errors)


def _apply_capture(entries: list[CaptureConfig], report: ImportReport, errors: list[str]) -> None:
    _apply_scoped(entries, CaptureRule, "capture", report, errors)


def _apply_scoped(
    entries: Sequence[LimitConfig | CaptureConfig],
    model: type[Limit] | type[CaptureRule],
    section: str,
    report: ImportReport,
    errors: list[str],
) -> None:
    """Rows matched by their (client, route) scope: limits and capture rules."""
    counts = report.counts[section]
    for i, entry in enumerate(entries):
        path = f"{section}[{i}]"
        client = route = None
        if entry.client is not None:
            client = ClientToken.objects.filter(name=entry.client).first()
        if entry.route is not None:
            route = Route.objects.filter(name=entry.route).first()
        if (entry.client is not None and client is None) or (
            entry.route is not None and route is None
        ):
            continue  # its entry in `clients` or `routes` failed: reported there
        values = entry.values()
        with _collect(errors, path, {}):
            row = model.objects.filter(client=client, route=route).first()
            _upsert(row, model, {"client": client, "route": route}, values, counts)


_REPLACEMENT_FIELD_NAMES = {
    "target_provider": "target.provider",
    "target_model": "target.model",
    "target_route": "target.route",
}


def _apply_replacement(
    entries: list[ReplacementConfig],
    providers: dict[str, Provider],
    report: ImportReport,
    errors: list[str],
) -> None:
    """Replacement rules, matched by name; the `target` replaces the current one whole."""
    counts = report.counts["replacement"]
    routes = {r.name: r for r in Route.objects.all()}
    for i, entry in enumerate(entries):
        path = f"replacement[{i}]"
        route = routes.get(entry.route)
        target = entry.target
        target_route = routes.get(target.route) if target.route is not None else None
        if route is None or (target.route is not None and target_route is None):
            continue  # its entry in `routes` failed: reported there
        values: dict[str, Any] = {
            **entry.values(),
            "route_id": route.pk,
            # Both kinds written, so that switching kind clears the other.
            "target_provider_id": providers[target.provider].pk if target.provider else None,
            "target_model": target.model or "",
            "target_route_id": target_route.pk if target_route is not None else None,
        }
        with _collect(errors, path, _REPLACEMENT_FIELD_NAMES):
            rule = ReplacementRule.objects.filter(name=entry.name).first()
            _upsert(rule, ReplacementRule, {"name": entry.name}, values, counts)


# ---------------------------------------------------------------------------------------------
# Export


def config_export() -> dict[str, Any]:
    """Everything as an importable document, without secrets.

    Keys whose secret is a reference keep it (a reference is not secret); keys stored encrypted
    come without `secret`, which an import into the same database accepts (the secret is kept)
    and an import elsewhere rejects until one is added. Clients come without tokens; revoked
    clients are left out, and so are their limits. Limit fields without a limit are left out.
    A replacement rule keeps every client name it lists, a revoked one's too (an import
    elsewhere then needs that client).
    """
    keys = []
    for key in ApiKey.objects.select_related("provider").order_by("provider__name", "key_id"):
        entry: dict[str, Any] = {"id": key.key_id, "provider": key.provider.name}
        if key.secret_ref:
            entry["secret"] = key.secret_ref
        entry.update(
            priority=key.priority,
            weight=key.weight,
            models=list(key.allowed_models),
            enabled=key.enabled,
        )
        for name in ("requests_per_minute", "tokens_per_minute"):
            if getattr(key, name) is not None:
                entry[name] = getattr(key, name)
        keys.append(entry)
    return {
        "version": CONFIG_VERSION,
        "providers": {
            p.name: {
                "kind": p.kind,
                "base_url": p.base_url,
                "requires_key": p.requires_key,
                "cooldown_seconds": p.cooldown_seconds,
                "quarantine_seconds": p.quarantine_seconds,
                "exhausted_seconds": p.exhausted_seconds,
                "enabled": p.enabled,
            }
            for p in Provider.objects.order_by("name")
        },
        "keys": keys,
        "routes": {
            r.name: {
                "strategy": r.strategy,
                "enabled": r.enabled,
                "deployments": [
                    {"provider": d.provider.name, "model": d.model} for d in r.deployments.all()
                ],
            }
            for r in Route.objects.order_by("name").prefetch_related("deployments__provider")
        },
        "clients": [
            _export_client(c)
            for c in ClientToken.objects.filter(revoked_at__isnull=True).order_by("name")
        ],
        "limits": _export_limits(),
        "capture": _export_capture(),
        "replacement": _export_replacement(),
    }


def _export_client(client: ClientToken) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": client.name,
        "routes": list(client.routes),
        "scopes": list(client.scopes),
        "never_replace": client.never_replace,
    }
    if client.expires_at is not None:  # left out, as most clients' would be null
        entry["expires_at"] = _time_text(client.expires_at)
    return entry


def _export_limits() -> list[dict[str, Any]]:
    limits = Limit.objects.select_related("client", "route").filter(
        Q(client__isnull=True) | Q(client__revoked_at__isnull=True)
    )
    entries = []
    for limit in limits:
        entry: dict[str, Any] = {}
        if limit.client is not None:
            entry["client"] = limit.client.name
        if limit.route is not None:
            entry["route"] = limit.route.name
        for name in LIMIT_FIELDS:
            value = getattr(limit, name)
            if isinstance(value, Decimal):
                # As a string: exact, and YAML and JSON have no decimal type.
                value = _decimal_text(value)
            if value is not None:
                entry[name] = value
        entries.append(entry)
    # In Python: the databases disagree on where a null sorts.
    return sorted(entries, key=lambda e: (e.get("client", ""), e.get("route", "")))


def _export_capture() -> list[dict[str, Any]]:
    entries = []
    for rule in CaptureRule.objects.select_related("client", "route"):
        entry: dict[str, Any] = {}
        if rule.client is not None:
            entry["client"] = rule.client.name
        if rule.route is not None:
            entry["route"] = rule.route.name
        entry["sample_rate"] = rule.sample_rate
        entry["until"] = _time_text(rule.until)
        entry["enabled"] = rule.enabled
        entries.append(entry)
    return sorted(entries, key=lambda e: (e.get("client", ""), e.get("route", "")))


def _export_replacement() -> list[dict[str, Any]]:
    rules = ReplacementRule.objects.select_related("route", "target_provider", "target_route")
    entries = []
    for rule in rules:
        target: dict[str, str]
        if rule.target_route is not None:
            target = {"route": rule.target_route.name}
        else:
            assert rule.target_provider is not None  # replacement_one_target
            target = {"provider": rule.target_provider.name, "model": rule.target_model}
        entries.append(
            {
                "name": rule.name,
                "route": rule.route.name,
                "target": target,
                "probability": rule.probability,
                "stickiness": rule.stickiness,
                "sticky_turns": rule.sticky_turns,
                "min_turn": rule.min_turn,
                # Names as written, revoked clients' too: dropping one could empty the list,
                # which would mean every client.
                "clients": list(rule.clients),
                "without_tools": rule.without_tools,
                "without_images": rule.without_images,
                "active_from": _time_text(rule.active_from),
                "active_until": _time_text(rule.active_until),
                "seed": rule.seed,
                "enabled": rule.enabled,
                "position": rule.position,
            }
        )
    # The order rules are tried in, sorted in Python like the others.
    return sorted(entries, key=lambda e: (e["route"], e["position"], e["name"]))


def _time_text(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value is not None else None


def _decimal_text(value: Decimal) -> str:
    text = f"{value.normalize():f}"
    whole, _, cents = text.partition(".")
    return f"{whole}.{cents.ljust(2, '0')}"
