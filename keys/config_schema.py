"""The config file's format as pydantic models; keys.config_io applies a parsed file.

The models are the reference, and their JSON Schema is published as docs/config.schema.json
(`manage.py export_config --schema`). Parsing reports every problem at once, each with its path
in the file (`keys[2].provider: unknown provider 'foo'`); nothing is written here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from types import UnionType
from typing import Annotated, Any, Literal, get_args, get_origin

from django.core.exceptions import ValidationError
from django.db.models import Model
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    StringConstraints,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic import ValidationError as PydanticValidationError
from pydantic_core import ErrorDetails, PydanticCustomError, PydanticKnownError

from keys.crypto import SecretError, resolve_reference
from keys.models import (
    BASE_URL_VALIDATORS,
    ApiKey,
    ClientToken,
    Provider,
    ReplacementRule,
    Route,
    slug_validator,
    validate_deployment_model,
    validate_route_name,
)
from keys.services import CLIENT_TOKEN_MIN_LENGTH, SecretSpec, api_key_parse_secret
from keys.strategies import DEFAULT_STRATEGY, STRATEGIES

CONFIG_VERSION: Literal[1] = 1
SECTIONS = ("providers", "keys", "routes", "clients", "limits", "capture", "replacement")
# Postgres' `integer`, the narrowest column these numbers land in; SQLite would take more, and a
# file that imports in one mode should import in the other.
INT_MAX = 2**31 - 1
# Limit.usd_per_*: DecimalField(max_digits=12, decimal_places=4).
USD_PLACES = 4
USD_MAX = Decimal(10) ** (12 - USD_PLACES)
# A USD amount written as a string: plain digits, so that "1e3" or " 5" is not a surprise.
_USD_TEXT = re.compile(r"[0-9]+(\.[0-9]+)?")
PLAINTEXT_WARNING = (
    "{path}: the secret is written in the file; prefer env://NAME or file://path "
    "(it is stored encrypted either way)"
)

Loc = tuple[int | str, ...]


class ConfigError(Exception):
    """The document is invalid. `errors` lists every problem, each starting with its path."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("\n".join(errors))


# ---------------------------------------------------------------------------------------------
# Checks pydantic has no word for. Each raises with the message shown to the user as it is.


def _error(message: str) -> PydanticCustomError:
    return PydanticCustomError("config", "{message}", {"message": message})


def _not_blank(value: str) -> str:
    if not value.strip():
        raise _error("expected a non-empty string")
    return value


def _django(*validators: Callable[[str], None]) -> AfterValidator:
    """The admin's validators, in its order, with its messages."""

    def check(value: str) -> str:
        try:
            for validator in validators:
                validator(value)
        except ValidationError as exc:
            raise _error("; ".join(exc.messages)) from None
        return value

    return AfterValidator(check)


def _one_of(allowed: list[str]) -> BeforeValidator:
    # Before the type check: `kind: 1` is answered with the choices, not "expected a string".
    def check(value: Any) -> Any:
        if not isinstance(value, str) or value not in allowed:
            raise _error(f"unknown value {value!r}; expected one of {', '.join(allowed)}")
        return value

    return BeforeValidator(check)


def _known(kind: str, context_key: str) -> AfterValidator:
    # The context holds the names of the file and of the database (see config_parse).
    def check(name: str, info: ValidationInfo) -> str:
        known = (info.context or {}).get(context_key)
        if known is not None and name not in known:
            raise _error(f"unknown {kind} '{name}'")
        return name

    return AfterValidator(check)


def _usd(value: Any) -> Decimal | None:
    """An amount in USD: a number or a decimal string (exact, which a YAML float is not)."""
    if value is None:
        return None  # written out: no limit
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        got = _TYPE_NAMES.get(type(value), type(value).__name__)
        raise _error(f"expected a number or a decimal string, got {got}")
    try:
        amount = Decimal(str(value))
    except InvalidOperation:
        amount = None
    if amount is not None and amount.is_finite() and amount < 0:
        raise _error("must be at least 0")
    if (
        amount is None
        or not amount.is_finite()
        or (isinstance(value, str) and not _USD_TEXT.fullmatch(value))
    ):
        raise _error(f"expected an amount such as 12.50 or '12.50', got {value!r}")
    if amount >= USD_MAX:
        raise _error(f"must be less than {USD_MAX}")
    exponent = amount.as_tuple().exponent
    if isinstance(exponent, int) and exponent < -USD_PLACES:
        raise _error(f"at most {USD_PLACES} decimal places")
    return amount


def _supported_version(value: Any) -> Any:
    # Python's True == 1 == 1.0, and pydantic's Literal takes them all, even when strict.
    if type(value) is not int or value != CONFIG_VERSION:
        raise _error(f"unsupported version {value!r}; expected {CONFIG_VERSION}")
    return value


def _secret(value: Any) -> SecretSpec:
    """What a `secret` (or `token`) means: a reference, or the value itself."""
    if not isinstance(value, str):
        # Null too: left out, a secret means "keep it" (a token "generate one"), but an explicit
        # null is more likely a template that rendered nothing.
        raise PydanticKnownError("string_type")
    try:
        return api_key_parse_secret(secret=value)
    except ValidationError as exc:
        raise _error("; ".join(exc.messages)) from None


def client_token(spec: SecretSpec) -> str:
    """The plaintext of a client's token, resolved now: only its hash is kept, so unlike an
    upstream key's secret there is nothing to resolve later."""
    token = spec.value
    if spec.kind == "reference":
        try:
            token = resolve_reference(spec.value)
        except SecretError as exc:
            raise _error(str(exc)) from None
    if len(token) < CLIENT_TOKEN_MIN_LENGTH:
        raise _error(f"a client token must be at least {CLIENT_TOKEN_MIN_LENGTH} characters long")
    return token


def _token(value: Any) -> SecretSpec:
    spec = _secret(value)
    client_token(spec)
    return spec


def _no_default(schema: dict[str, Any]) -> None:
    # For a field whose absence means something (keep, generate) rather than a value.
    del schema["default"]


def _default(model: type[Model], name: str) -> Any:
    # What a new row gets, so that the published defaults cannot drift from the database's.
    return model._meta.get_field(name).get_default()  # type: ignore[union-attr]


# A non-blank string no longer than its column (minLength is for editors; spaces are refused too).
_NotBlank = AfterValidator(_not_blank)
_Text64 = Annotated[str, StringConstraints(min_length=1, max_length=64), _NotBlank]
_Text100 = Annotated[str, StringConstraints(min_length=1, max_length=100), _NotBlank]
_Text200 = Annotated[str, StringConstraints(min_length=1, max_length=200), _NotBlank]
_Text500 = Annotated[str, StringConstraints(min_length=1, max_length=500), _NotBlank]
_Name = Annotated[_Text64, _django(slug_validator)]
_ProviderRef = Annotated[_Text64, _known("provider", "providers")]
_BaseUrl = Annotated[_Text500, _django(*BASE_URL_VALIDATORS)]
_Seconds = Annotated[int, Field(ge=0, le=INT_MAX)]
# A limit: a positive count, or null (or left out of a new entry) for none.
_Count = Annotated[int, Field(ge=1, le=INT_MAX)] | None
_Usd = Annotated[
    Decimal | None,
    PlainValidator(_usd),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", "minimum": 0, "exclusiveMaximum": int(USD_MAX)},
                {"type": "string", "pattern": f"^{_USD_TEXT.pattern}$"},
                {"type": "null"},
            ]
        }
    ),
]
_ClientRef = Annotated[_Text100, _known("client", "clients")]
_RouteRef = Annotated[_Text200, _known("route", "routes")]
# Parsed, and published as the strings they are in the file.
_Secret = Annotated[SecretSpec | None, PlainValidator(_secret), WithJsonSchema({"type": "string"})]
_Token = Annotated[SecretSpec | None, PlainValidator(_token), WithJsonSchema({"type": "string"})]
# A choice, checked with the house wording and published as an enum.
_KINDS = sorted(Provider.Kind.values)
_Kind = Annotated[str, _one_of(_KINDS), Field(json_schema_extra={"enum": _KINDS})]
_STRATEGIES = sorted(value for value, _ in STRATEGIES)
_Strategy = Annotated[str, _one_of(_STRATEGIES), Field(json_schema_extra={"enum": _STRATEGIES})]
_SCOPES = sorted(ClientToken.Scope.values)
_Scope = Annotated[str, _one_of(_SCOPES), Field(json_schema_extra={"enum": _SCOPES})]
_STICKINESS = sorted(ReplacementRule.Stickiness.values)
_Stickiness = Annotated[str, _one_of(_STICKINESS), Field(json_schema_extra={"enum": _STICKINESS})]
# Not strict: a file gives a string, YAML may already have made it a datetime.
_Time = Annotated[AwareDatetime, Field(strict=False)] | None

_ENABLED = "false takes it out of routing without deleting it."
_PROVIDER_REF = "A provider of this file or one already in the database."

# ---------------------------------------------------------------------------------------------
# The models. Fields left out of an entry keep their current value on import (see
# keys.config_io); the defaults below are what a new row gets.


class _Entry(BaseModel):
    # Strict: `weight: true` or `priority: "1"` is a mistake in the file, not a value to coerce.
    model_config = ConfigDict(extra="forbid", strict=True)


class ProviderConfig(_Entry):
    """An upstream API and how long its keys rest after each kind of failure."""

    kind: _Kind = Field(
        default=_default(Provider, "kind"),
        description="`anthropic` serves /v1/messages natively and /v1/chat/completions "
        "translated to its Messages API; `openai_compatible` is vLLM, Ollama, LM Studio, …",
    )
    base_url: _BaseUrl = Field(
        description="http(s), including the version prefix (https://api.openai.com/v1); no "
        "credentials, query string or fragment.",
    )
    requires_key: bool = Field(
        default=_default(Provider, "requires_key"),
        description="false for a local server that takes no key (Ollama, vLLM, LocalAI): calls "
        "go without one, and rotation and health apply to the endpoint alone.",
    )
    cooldown_seconds: _Seconds = Field(
        default=_default(Provider, "cooldown_seconds"),
        description="Rest after a 429 that carries no Retry-After.",
    )
    quarantine_seconds: _Seconds = Field(
        default=_default(Provider, "quarantine_seconds"),
        description="After a 401/403 the key waits this long, then must pass a re-check.",
    )
    exhausted_seconds: _Seconds = Field(
        default=_default(Provider, "exhausted_seconds"),
        description="Rest after a quota or billing error.",
    )
    enabled: bool = Field(default=_default(Provider, "enabled"), description=_ENABLED)


class KeyConfig(_Entry):
    """An upstream API key, matched by `id`."""

    id: _Name = Field(description="The stable name used in records and logs, e.g. openai-1.")
    provider: _ProviderRef = Field(description=_PROVIDER_REF)
    secret: _Secret = Field(
        default=None,
        json_schema_extra=_no_default,
        description="`env://NAME` (read from the environment at run time, never stored), "
        "`file:///path` (read from a file at run time, never stored), `literal://VALUE` or a "
        "bare value (stored encrypted, with a warning: prefer a reference). Required when the "
        "key is created; left out, the current one is kept.",
    )
    priority: Annotated[int, Field(ge=-INT_MAX - 1, le=INT_MAX)] = Field(
        default=_default(ApiKey, "priority"), description="Lower numbers are tried first."
    )
    weight: Annotated[int, Field(ge=1, le=INT_MAX)] = Field(
        default=_default(ApiKey, "weight"), description="Share for the `weighted` strategy."
    )
    models: list[_Text200] = Field(
        default=_default(ApiKey, "allowed_models"),
        description="Upstream models this key may serve; empty means all.",
    )
    enabled: bool = Field(default=_default(ApiKey, "enabled"), description=_ENABLED)
    requests_per_minute: _Count = Field(
        default=_default(ApiKey, "requests_per_minute"),
        description="The provider's request limit for this key (RPM), when known: the gateway "
        "keeps the key under it instead of waiting for a 429. null: none known.",
    )
    tokens_per_minute: _Count = Field(
        default=_default(ApiKey, "tokens_per_minute"),
        description="The provider's token limit for this key (TPM), when known. null: none known.",
    )

    def values(self) -> dict[str, Any]:
        """The ApiKey fields the file sets."""
        given = self.model_dump(exclude_unset=True, exclude={"id", "provider", "secret"})
        if "models" in given:
            given["allowed_models"] = given.pop("models")
        return given


class DeploymentConfig(_Entry):
    """One step of a route's fallback chain."""

    provider: _ProviderRef = Field(description=_PROVIDER_REF)
    model: Annotated[_Text200, _django(validate_deployment_model)] = Field(
        description="The model name sent upstream. On a pattern route (a name with '*'), a '*' "
        "here is replaced by what the route's '*' matched."
    )


class RouteConfig(_Entry):
    """What clients may ask for, by the model name they send, and where it goes."""

    strategy: _Strategy = Field(
        default=DEFAULT_STRATEGY,
        description="How a key is picked among a deployment's keys (see the README).",
    )
    enabled: bool = Field(default=_default(Route, "enabled"), description=_ENABLED)
    deployments: list[DeploymentConfig] = Field(
        min_length=1,
        description="The fallback chain, in order: every key of a deployment is tried before "
        "the next one. Replaced as a whole on import.",
    )


class ClientConfig(_Entry):
    """A caller of the gateway, matched by `name`."""

    name: _Text100 = Field(description="Shown in usage records and the dashboard.")
    token: _Token = Field(
        default=None,
        json_schema_extra=_no_default,
        description="Left out, a new client gets a generated token, printed once, and an "
        "existing one keeps its token. Given (best as env://NAME or file:///path), it is "
        f"resolved at import and only its hash is stored; at least {CLIENT_TOKEN_MIN_LENGTH} "
        "characters.",
    )
    routes: list[_Text200] = Field(
        default=["*"], description='The route names this client may use; ["*"] for all.'
    )
    scopes: list[_Scope] = Field(
        default=[ClientToken.Scope.PROXY.value],
        description="`proxy` to call models, `monitor` to read the monitoring API.",
    )
    never_replace: bool = Field(
        default=_default(ClientToken, "never_replace"),
        description="true: this client's requests are never sent to a replacement model "
        "(see `replacement`), whatever the rules say.",
    )
    expires_at: _Time = Field(
        default=None,
        description="When the token stops working (ISO 8601 with a time zone, "
        "'2027-01-01T00:00:00Z'): from then on it gets 401 token_expired. null: never.",
    )


_NO_LIMIT = " null: no limit."


class LimitConfig(_Entry):
    """Limits on what clients may use, matched by their scope: one client on any route, one
    route for any client, or one client on one route. Every limit that applies to a request
    must have room for it. Days and months are those of LLMROTATE_LIMITS_TIME_ZONE (UTC by
    default)."""

    model_config = ConfigDict(
        json_schema_extra={"anyOf": [{"required": ["client"]}, {"required": ["route"]}]}
    )

    client: _ClientRef | None = Field(
        default=None,
        description="A client (by name) of this file or one already in the database. Left "
        "out: the limit is the route's, shared by all its clients.",
    )
    route: _RouteRef | None = Field(
        default=None,
        description="A route (by name) of this file or one already in the database. Left out: "
        "the limit is the client's, across all routes.",
    )
    requests_per_minute: _Count = Field(
        default=None, description="Requests per clock minute." + _NO_LIMIT
    )
    requests_per_day: _Count = Field(default=None, description="Requests per day." + _NO_LIMIT)
    tokens_per_minute: _Count = Field(
        default=None, description="Prompt plus completion tokens per clock minute." + _NO_LIMIT
    )
    tokens_per_day: _Count = Field(
        default=None, description="Prompt plus completion tokens per day." + _NO_LIMIT
    )
    max_concurrent: _Count = Field(
        default=None, description="Requests in flight at once." + _NO_LIMIT
    )
    usd_per_day: _Usd = Field(
        default=None,
        description='Spend per day in USD, a number or a decimal string ("12.50").' + _NO_LIMIT,
    )
    usd_per_month: _Usd = Field(
        default=None,
        description="Spend per calendar month in USD, a number or a decimal string." + _NO_LIMIT,
    )

    @model_validator(mode="after")
    def _scoped(self) -> LimitConfig:
        if self.client is None and self.route is None:
            raise _error("a limit needs a client, a route, or both")
        return self

    def values(self) -> dict[str, Any]:
        """The Limit fields the file sets."""
        return self.model_dump(exclude_unset=True, exclude={"client", "route"})


class CaptureConfig(_Entry):
    """A wire-capture rule (docs/capture.md), matched by its scope: all traffic (neither client
    nor route), one client, one route, or one client on one route. Capture files hold prompts
    and completions: keep rules narrow and give them an end."""

    client: _ClientRef | None = Field(
        default=None, description="A client (by name). Left out: any client."
    )
    route: _RouteRef | None = Field(default=None, description="A route (by name). Left out: any.")
    sample_rate: float = Field(
        default=1.0, ge=0.0, le=1.0, description="The share of matching requests captured, 0-1."
    )
    # Not strict: a file gives a string, YAML may already have made it a datetime.
    until: _Time = Field(
        default=None,
        description="When capturing stops (ISO 8601 with a time zone, '2026-12-07T12:00:00Z'). "
        "null: no end.",
    )
    enabled: bool = Field(default=True)

    def values(self) -> dict[str, Any]:
        """The CaptureRule fields the file sets."""
        return self.model_dump(exclude_unset=True, exclude={"client", "route"})


def _plain_model(value: str) -> str:
    if "*" in value:
        raise _error("a replacement's model is a plain model name, without '*'")
    return value


def _exact_route(value: str) -> str:
    # A pattern has no deployments of its own until a request's model fills in its '*'.
    if "*" in value:
        raise _error("must be an exact route, not a pattern (a name with '*')")
    return value


class ReplacementTargetConfig(_Entry):
    """Where replaced requests go first: a provider's model, or another route (its
    deployments, in their order). The rule's own route stays behind it for failover."""

    model_config = ConfigDict(
        json_schema_extra={
            "oneOf": [{"required": ["provider", "model"]}, {"required": ["route"]}],
            "not": {
                "anyOf": [{"required": ["provider", "route"]}, {"required": ["model", "route"]}]
            },
        }
    )

    provider: _ProviderRef | None = Field(
        default=None,
        json_schema_extra=_no_default,
        description=_PROVIDER_REF + " Given with `model`.",
    )
    model: Annotated[_Text200, AfterValidator(_plain_model)] | None = Field(
        default=None,
        json_schema_extra=_no_default,
        description="The model name sent to `provider`.",
    )
    route: Annotated[_RouteRef, AfterValidator(_exact_route)] | None = Field(
        default=None,
        json_schema_extra=_no_default,
        description="Instead of `provider` and `model`: an exact route of this file or one "
        "already in the database, not the rule's own.",
    )

    @model_validator(mode="after")
    def _one_kind(self) -> ReplacementTargetConfig:
        # Optional only so that either kind can be left out: a written null is a mistake.
        for name in sorted(self.model_fields_set):
            if getattr(self, name) is None:
                raise _error(f"{name}: expected a non-empty string, got nothing")
        if self.route is not None and (self.provider is not None or self.model is not None):
            raise _error("either {provider, model} or {route}, not both")
        if self.route is not None:
            return self
        if self.provider is None and self.model is None:
            raise _error("expected {provider, model} or {route}")
        if self.provider is None:
            raise _error("a model needs its provider: {provider, model}")
        if self.model is None:
            raise _error("a provider needs the model to send it: {provider, model}")
        return self


class ReplacementConfig(_Entry):
    """A model replacement experiment (docs/replacement.md), matched by `name`: a share of a
    route's requests goes first to another model; the rest are its control group."""

    name: _Name = Field(
        description="Names the experiment in records, metrics and the response header."
    )
    route: _RouteRef = Field(
        description="The route (by name) whose requests are replaced: one of this file or "
        "already in the database."
    )
    target: ReplacementTargetConfig = Field(
        description="{provider, model} or {route}: what answers a replaced request."
    )
    probability: float = Field(
        default=_default(ReplacementRule, "probability"),
        ge=0.0,
        le=1.0,
        description="The share of eligible requests replaced, 0-1.",
    )
    stickiness: _Stickiness = Field(
        default=_default(ReplacementRule, "stickiness"),
        description="`per_request`: each request draws again; `per_session`: a replaced "
        "session stays replaced for `sticky_turns` turns.",
    )
    sticky_turns: Annotated[int, Field(ge=1, le=1000)] = Field(
        default=_default(ReplacementRule, "sticky_turns"),
        description="Per session: how many turns a replaced session stays replaced.",
    )
    min_turn: Annotated[int, Field(ge=0, le=32767)] = Field(
        default=_default(ReplacementRule, "min_turn"),
        description="Only from this turn of a session on; 0: any request.",
    )
    clients: list[_ClientRef] = Field(
        default=_default(ReplacementRule, "clients"),
        description="Only for these clients (by name, of this file or already in the "
        "database); empty: every client.",
    )
    without_tools: bool = Field(
        default=_default(ReplacementRule, "without_tools"),
        description="Only requests that offer no tools.",
    )
    without_images: bool = Field(
        default=_default(ReplacementRule, "without_images"),
        description="Only requests that carry no images.",
    )
    active_from: _Time = Field(
        default=None,
        description="When the rule starts (ISO 8601 with a time zone, '2026-12-07T12:00:00Z'). "
        "null: already.",
    )
    active_until: _Time = Field(
        default=None,
        description="When the rule stops (ISO 8601 with a time zone), after `active_from`. "
        "null: no end.",
    )
    seed: Annotated[str, StringConstraints(max_length=64)] = Field(
        default=_default(ReplacementRule, "seed"),
        description="Seeds the draw; empty: the rule's name. The same request id (or session) "
        "and seed always draw the same.",
    )
    enabled: bool = Field(default=_default(ReplacementRule, "enabled"), description=_ENABLED)
    position: Annotated[int, Field(ge=0, le=INT_MAX)] = Field(
        default=_default(ReplacementRule, "position"),
        description="A route's rules are tried in this order (then by name); a request "
        "belongs to the first whose conditions it meets.",
    )

    @field_validator("active_until")
    @classmethod
    def _after_start(cls, value: Any, info: ValidationInfo) -> Any:
        start = info.data.get("active_from")
        if value is not None and start is not None and value <= start:
            raise _error("the window ends before it starts (active_from)")
        return value

    def values(self) -> dict[str, Any]:
        """The ReplacementRule fields the file sets, other than its route and target."""
        return self.model_dump(exclude_unset=True, exclude={"name", "route", "target"})


class ConfigFile(_Entry):
    """Providers, upstream keys, routes, clients, limits, capture and replacement rules for
    llmrotate's `import_config`, which creates or updates them by name and keeps what the file
    leaves out."""

    model_config = ConfigDict(
        title="llmrotate configuration",
        json_schema_extra={"$schema": "https://json-schema.org/draft/2020-12/schema"},
    )

    version: Annotated[Literal[1], BeforeValidator(_supported_version)] = Field(
        default=CONFIG_VERSION, description="The only version so far."
    )
    providers: dict[_Name, ProviderConfig] | None = Field(
        default=None, description="By name: letters, digits, '.', '_', ':' and '-'."
    )
    keys: list[KeyConfig] | None = Field(default=None, description="Upstream API keys.")
    routes: dict[Annotated[_Text200, _django(validate_route_name)], RouteConfig] | None = Field(
        default=None,
        description="By the model name clients send; a name with one '*' ('*', 'ollama/*') is "
        "a pass-through pattern.",
    )
    clients: list[ClientConfig] | None = Field(
        default=None, description="Callers of the gateway, each with its token."
    )
    limits: list[LimitConfig] | None = Field(
        default=None,
        description="Requests, tokens, concurrency and spend allowed per client, per route, or "
        "per client on a route.",
    )
    capture: list[CaptureConfig] | None = Field(
        default=None,
        description="Wire-capture rules: which requests are recorded exactly as they crossed "
        "the wire (off unless a rule says so).",
    )
    replacement: list[ReplacementConfig] | None = Field(
        default=None,
        description="Model replacement experiments: a share of a route's requests answered "
        "by another model (docs/replacement.md).",
    )


def config_json_schema() -> str:
    """docs/config.schema.json, as committed (a test compares the two)."""
    return json.dumps(ConfigFile.model_json_schema(), indent=2, ensure_ascii=False) + "\n"


# ---------------------------------------------------------------------------------------------
# Parsing


def config_parse(*, data: Any) -> tuple[ConfigFile, list[str]]:
    """A loaded YAML/JSON document → the validated file and its warnings.

    Raises ConfigError with every problem, each with its path. Provider, client and route names
    are checked against the file and the database: call it inside the transaction that writes.
    """
    known = set(Provider.objects.values_list("name", flat=True))
    clients = set(ClientToken.objects.values_list("name", flat=True))
    routes = set(Route.objects.values_list("name", flat=True))
    if isinstance(data, dict):
        if isinstance(data.get("providers"), dict):
            known.update(name for name in data["providers"] if isinstance(name, str))
        if isinstance(data.get("routes"), dict):
            routes.update(name for name in data["routes"] if isinstance(name, str))
        if isinstance(data.get("clients"), list):
            clients.update(
                entry["name"]
                for entry in data["clients"]
                if isinstance(entry, dict) and isinstance(entry.get("name"), str)
            )
    errors: list[tuple[Loc, str]] = []
    doc = None
    try:
        context = {"providers": known, "clients": clients, "routes": routes}
        doc = ConfigFile.model_validate(data, context=context)
    except PydanticValidationError as exc:
        errors = [(e["loc"], _message(e)) for e in exc.errors()]
    if isinstance(data, dict):
        errors += _duplicates(data)
    if errors or doc is None:
        # In the file's order of sections; the order of pydantic's errors within each.
        order = {name: i for i, name in enumerate(("version", *SECTIONS))}
        errors.sort(key=lambda error: order.get(str(error[0][0]) if error[0] else "", -1))
        raise ConfigError([f"{_walk(loc)[0]}: {message}" for loc, message in errors])
    return doc, _warnings(doc)


_TYPE_NAMES: dict[type, str] = {bool: "a boolean", int: "a number", float: "a number"}
_TYPE_NAMES |= {str: "a string", list: "a list", dict: "a mapping", type(None): "nothing"}
# pydantic's error types in the house wording; {got} is what the file has instead.
_MESSAGES = {
    "missing": "required",
    "model_type": "expected a mapping, got {got}",
    "dict_type": "expected a mapping, got {got}",
    "list_type": "expected a list, got {got}",
    "string_type": "expected a non-empty string, got {got}",
    "string_too_short": "expected a non-empty string",
    "string_too_long": "longer than {max_length} characters",
    "int_type": "expected an integer, got {got}",
    "bool_type": "expected true or false, got {got}",
    "float_type": "expected a number, got {got}",
    "timezone_aware": "expected a time with a time zone, such as '2026-12-07T12:00:00Z'",
    "greater_than_equal": "must be at least {ge}",
    "less_than_equal": "must be at most {le}",
    "too_short": "expected a non-empty list of {{provider, model}}",  # only `deployments`
}


def _message(error: ErrorDetails) -> str:
    loc, kind = error["loc"], type(error["input"])
    if error["type"] == "extra_forbidden" and len(loc) == 1:
        return f"unknown section; expected one of version, {', '.join(SECTIONS)}"
    if error["type"] == "extra_forbidden":
        fields = sorted(_walk(loc[:-1])[1].model_fields)
        return f"unknown field; expected one of {', '.join(fields)}"
    if error["type"] in _MESSAGES:
        got = _TYPE_NAMES.get(kind, kind.__name__)
        return _MESSAGES[error["type"]].format(got=got, **error.get("ctx", {}))
    # Ours (PydanticCustomError), and any of pydantic's not foreseen above.
    return error["msg"]


def _walk(loc: Loc) -> tuple[str, Any]:
    """`loc` as a path in the file (`keys[2].provider`, `routes.gpt-4o.deployments[0].model`)
    and the type found there, following the annotations from the top: pydantic's errors name
    neither mappings from lists nor the model they are about."""
    path = ""
    node: Any = ConfigFile
    for part in loc:
        if part == "[key]":  # a bad mapping key is reported at the entry it names
            continue
        if get_origin(node) is list:
            path, node = f"{path}[{part}]", get_args(node)[0]
            continue
        if isinstance(node, type) and issubclass(node, BaseModel):
            field = node.model_fields.get(str(part))
            node = field.annotation if field else None  # None: an unknown field, the last part
            if isinstance(node, UnionType):  # a section: `dict[...] | None`
                node = get_args(node)[0]
        else:  # a mapping: the part is a name
            node = get_args(node)[-1]
        path = f"{path}.{part}" if path else str(part)
    return path or "(document)", node


def _duplicates(data: dict[Any, Any]) -> list[tuple[Loc, str]]:
    """Entries that repeat an earlier one's id, name or token. Checked on the document as
    loaded, so that they are reported together with every other error."""

    def token(text: str) -> str | None:
        try:
            return client_token(_secret(text))
        except PydanticCustomError:
            return None  # reported by the field's own check

    errors: list[tuple[Loc, str]] = []
    checks: list[tuple[str, str, Callable[[str], str | None], str]] = [
        ("keys", "id", str, "duplicate id '{value}' (also {first})"),
        ("clients", "name", str, "duplicate name '{value}' (also {first})"),
        ("clients", "token", token, "same token as {first}"),
        ("replacement", "name", str, "duplicate name '{value}' (also {first})"),
    ]
    for section, field, identity, message in checks:
        entries = data.get(section)
        seen: dict[str, int] = {}
        for i, entry in enumerate(entries if isinstance(entries, list) else []):
            value = entry.get(field) if isinstance(entry, dict) else None
            same = identity(value) if isinstance(value, str) else None
            if same is None:
                continue
            if same in seen:
                first = f"{section}[{seen[same]}]"
                errors.append(((section, i, field), message.format(value=value, first=first)))
            seen.setdefault(same, i)
    return (
        errors
        + _duplicate_scopes(data.get("limits"), "limits", "limit", unscoped=False)
        + _duplicate_scopes(data.get("capture"), "capture", "capture rule", unscoped=True)
        + _own_route_targets(data.get("replacement"))
    )


def _own_route_targets(entries: Any) -> list[tuple[Loc, str]]:
    """A rule whose target is its own route would replace a route by itself. Checked here, on
    the document as loaded: the target alone does not know which route its rule is on."""
    errors: list[tuple[Loc, str]] = []
    for i, entry in enumerate(entries if isinstance(entries, list) else []):
        if not isinstance(entry, dict) or not isinstance(entry.get("target"), dict):
            continue
        route, target = entry.get("route"), entry["target"].get("route")
        if isinstance(route, str) and route == target:
            message = f"'{route}' is the rule's own route: a rule cannot point at its own route"
            errors.append((("replacement", i, "target", "route"), message))
    return errors


def _duplicate_scopes(
    entries: Any, section: str, noun: str, *, unscoped: bool
) -> list[tuple[Loc, str]]:
    """Limits and capture rules are matched by their scope (client, route), so two entries of
    one scope would fight. A capture rule may have neither (all traffic); a limit may not."""
    errors: list[tuple[Loc, str]] = []
    seen: dict[tuple[str | None, str | None], int] = {}
    for i, entry in enumerate(entries if isinstance(entries, list) else []):
        if not isinstance(entry, dict):
            continue
        client, route = entry.get("client"), entry.get("route")
        if not all(name is None or isinstance(name, str) for name in (client, route)):
            continue  # reported by the field's own check
        if client is None and route is None and not unscoped:
            continue  # likewise
        scope = (client, route)
        if scope in seen:
            who = "any client" if client is None else f"client '{client}'"
            where = "any route" if route is None else f"route '{route}'"
            message = f"duplicate {noun} for {who} on {where} (also {section}[{seen[scope]}])"
            errors.append(((section, i), message))
        seen.setdefault(scope, i)
    return errors


def _warnings(doc: ConfigFile) -> list[str]:
    warnings = []
    for i, key in enumerate(doc.keys or []):
        path, spec = f"keys[{i}].secret", key.secret
        if spec is None:
            continue
        if spec.kind != "reference":
            warnings.append(PLAINTEXT_WARNING.format(path=path))
            continue
        try:
            resolve_reference(spec.value)
        except SecretError as exc:
            # Not an error: the variable may exist only where the proxy runs.
            warnings.append(f"{path}: {spec.value} cannot be resolved here: {exc}")
    for i, client in enumerate(doc.clients or []):
        if client.token is not None and client.token.kind != "reference":
            warnings.append(PLAINTEXT_WARNING.format(path=f"clients[{i}].token"))
    return warnings
