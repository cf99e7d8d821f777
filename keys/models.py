"""Providers, upstream keys, routes with their fallback chains, and client tokens.

Health state (cooldowns, quarantine, counters) is not here: it changes on every call, so it
lives in the key state store (in process, or Redis when scaled out). See keys/state_store.py.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from decimal import Decimal
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from django.core.exceptions import ValidationError
from django.core.validators import (
    MaxValueValidator,
    MinValueValidator,
    RegexValidator,
    URLValidator,
)
from django.db import models
from django.utils.regex_helper import _lazy_re_compile
from django.utils.translation import gettext
from django.utils.translation import gettext_lazy as _

from keys.strategies import STRATEGIES

if TYPE_CHECKING:
    from django_stubs_ext import StrOrPromise

slug_validator = RegexValidator(
    r"^[A-Za-z0-9][A-Za-z0-9._:-]*$",
    _("Use letters, digits, '.', '_', ':' and '-', starting with a letter or digit."),
)


# A limit of 0 would refuse everything; an empty field is "no limit".
_AT_LEAST_1 = [MinValueValidator(1)]


class BaseUrlValidator(URLValidator):
    """Django's URL check, also accepting a host name without a dot: the service names of
    Docker Compose and Kubernetes (`http://ollama:11434/v1`, `http://vllm:8000/v1`)."""

    host_re = "(" + URLValidator.host_re + "|" + URLValidator.hostname_re + ")"
    regex = _lazy_re_compile(
        r"^(?:[a-z0-9.+-]*)://"
        r"(?:[^\s:@/]+(?::[^\s:@/]*)?@)?"
        r"(?:" + URLValidator.ipv4_re + "|" + URLValidator.ipv6_re + "|" + host_re + ")"
        r"(?::[0-9]{1,5})?"
        r"(?:[/?#][^\s]*)?"
        r"\Z",
        re.IGNORECASE,
    )


def validate_base_url(value: str) -> None:
    """What the proxy can append paths to. httpx would send userinfo as Basic auth instead of
    the key, and `/chat/completions` appended after a query or fragment would land in it."""
    try:
        parts = urlsplit(value)
    except ValueError:
        raise ValidationError(gettext("Enter a valid URL.")) from None
    if parts.scheme not in ("http", "https"):
        raise ValidationError(gettext("base_url must start with http:// or https://"))
    if "@" in parts.netloc:
        raise ValidationError(
            gettext("base_url must not contain credentials; put the key in an API key")
        )
    if "?" in value or "#" in value:  # even an empty one: `https://host/v1?`
        raise ValidationError(gettext("base_url must not contain a query string or fragment"))


def validate_key_id(value: str) -> None:
    # keys.routing.keyless_key names a keyless provider's endpoint `<provider>:keyless`.
    if value.endswith(":keyless"):
        raise ValidationError(
            gettext("Key ids ending in ':keyless' are reserved for keyless providers.")
        )


# The scheme is left to validate_base_url, whose message says which are accepted.
BASE_URL_VALIDATORS: list[Callable[[Any], None]] = [BaseUrlValidator(), validate_base_url]


class Provider(models.Model):
    class Kind(models.TextChoices):
        OPENAI = "openai", "OpenAI"
        ANTHROPIC = "anthropic", "Anthropic"
        OPENAI_COMPATIBLE = "openai_compatible", _("OpenAI-compatible (vLLM, Ollama, …)")

    name = models.CharField(max_length=64, unique=True, validators=[slug_validator])
    kind = models.CharField(max_length=32, choices=Kind.choices, default=Kind.OPENAI)
    base_url = models.CharField(
        max_length=500,
        validators=BASE_URL_VALIDATORS,
        help_text=_("Including the version prefix, e.g. https://api.openai.com/v1"),
    )
    enabled = models.BooleanField(default=True)
    requires_key = models.BooleanField(
        default=True,
        help_text=_(
            "Off for a local server that takes no key (Ollama, vLLM, LocalAI): calls go without "
            "one, and rotation and health apply to the endpoint alone."
        ),
    )
    cooldown_seconds = models.PositiveIntegerField(
        default=30, help_text=_("Cooldown after a 429 that carries no Retry-After.")
    )
    quarantine_seconds = models.PositiveIntegerField(
        default=300,
        help_text=_("After a 401/403 the key waits this long, then must pass a re-check."),
    )
    exhausted_seconds = models.PositiveIntegerField(
        default=3600, help_text=_("Pause after a quota or billing error.")
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class ApiKey(models.Model):
    """An upstream provider key.

    The secret is one of: Fernet ciphertext (`secret_encrypted`), or a reference
    (`secret_ref`, `env://NAME` or `file://path`) whose value never enters the database.
    """

    key_id = models.CharField(
        _("key id"),
        max_length=64,
        unique=True,
        validators=[slug_validator, validate_key_id],
        help_text=_("Stable name used in logs and records, e.g. openai-1."),
    )
    provider = models.ForeignKey(Provider, on_delete=models.CASCADE, related_name="keys")
    secret_encrypted = models.TextField(blank=True, default="", editable=False)
    secret_ref = models.CharField(max_length=500, blank=True, default="", editable=False)
    # Masked form computed when the secret was set, so lists never need to decrypt.
    secret_hint = models.CharField(max_length=64, blank=True, default="", editable=False)
    enabled = models.BooleanField(default=True)
    priority = models.IntegerField(default=0, help_text=_("Lower numbers are tried first."))
    weight = models.PositiveIntegerField(
        default=1, validators=[MinValueValidator(1)], help_text=_("Share for weighted strategies.")
    )
    allowed_models = models.JSONField(
        _("models"),
        default=list,
        blank=True,
        help_text=_("Upstream models this key may serve. Empty means all."),
    )
    # The provider's own limits for this key, known in advance: the gateway spreads traffic
    # before the provider answers 429, and skips the key while it has no headroom left.
    requests_per_minute = models.PositiveIntegerField(
        null=True,
        blank=True,
        validators=_AT_LEAST_1,
        help_text=_("The provider's request limit for this key (RPM)."),
    )
    tokens_per_minute = models.PositiveIntegerField(
        null=True,
        blank=True,
        validators=_AT_LEAST_1,
        help_text=_("The provider's token limit for this key (TPM)."),
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["provider__name", "priority", "key_id"]
        verbose_name = _("API key")

    def __str__(self) -> str:
        return self.key_id


def validate_route_name(value: str) -> None:
    if value.count("*") > 1:
        raise ValidationError(
            gettext("A route pattern has at most one '*' (e.g. '*', 'ollama/*', 'llama*').")
        )


def validate_pattern_model(route: str, model: str) -> None:
    """A deployment's `*` receives what its route's `*` matched: only a pattern route has one."""
    if "*" in model and "*" not in route:
        raise ValidationError(
            gettext("Only a pattern route (a name with '*') can forward a '*' model.")
        )


def validate_deployment_model(value: str) -> None:
    if value.count("*") > 1:
        raise ValidationError(gettext("A deployment's model has at most one '*'."))


class Route(models.Model):
    """What clients ask for (the `model` of a request) and where it may go, in order.

    A name with a `*` is a pattern (pass-through): it serves every model name it matches that
    no exact route serves, and a deployment model with a `*` receives what the route's `*`
    matched (`ollama/*` → `*` forwards `ollama/llama3` as `llama3`; `*` → `*` forwards it as it
    is). keys.routing.route_lookup says which pattern wins when several match.
    """

    name = models.CharField(
        max_length=200,
        unique=True,
        validators=[validate_route_name],
        help_text=_(
            "The model name clients send, e.g. gpt-4o-mini; or a pattern with one '*' ('*', "
            "'ollama/*', 'llama*') that forwards the name the client sent."
        ),
    )
    strategy = models.CharField(max_length=32, choices=STRATEGIES, default="health_aware")
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class Deployment(models.Model):
    """One step of a route's fallback chain: a provider and the model name it knows."""

    route = models.ForeignKey(Route, on_delete=models.CASCADE, related_name="deployments")
    position = models.PositiveIntegerField(default=0)
    provider = models.ForeignKey(Provider, on_delete=models.CASCADE, related_name="deployments")
    model = models.CharField(
        max_length=200,
        validators=[validate_deployment_model],
        help_text=_(
            "Model name sent upstream. On a pattern route a '*' here is replaced by what the "
            "route's '*' matched ('*' alone forwards that part as it is)."
        ),
    )

    class Meta:
        ordering = ["route", "position", "id"]
        constraints = [
            models.UniqueConstraint(fields=["route", "position"], name="deployment_position")
        ]

    def __str__(self) -> str:
        return f"{self.provider.name}/{self.model}"

    def clean(self) -> None:
        route = getattr(self, "route", None)
        if route is not None:
            try:
                validate_pattern_model(route.name, self.model)
            except ValidationError as exc:
                raise ValidationError({"model": exc.messages}) from None


class ClientToken(models.Model):
    """A credential for callers of the gateway. Only a hash is stored; the token is shown once."""

    class Scope(models.TextChoices):
        PROXY = "proxy", _("proxy (call models)")
        MONITOR = "monitor", _("monitor (read the monitoring API)")

    name = models.CharField(max_length=100, unique=True)
    prefix = models.CharField(max_length=16, unique=True, editable=False)
    token_hash = models.CharField(max_length=64, editable=False)
    routes = models.JSONField(
        default=list, blank=True, help_text=_('Route names this token may use; ["*"] for all.')
    )
    scopes = models.JSONField(default=list, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    expires_at = models.DateTimeField(
        null=True,
        blank=True,
        help_text=_("From then on the token is refused (401 token_expired). Empty: never."),
    )
    never_replace = models.BooleanField(
        default=False,
        help_text=_(
            "This client's requests are never sent to a replacement model "
            "(docs/replacement.md): an opt-out from every experiment."
        ),
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @property
    def masked(self) -> str:
        return f"llmr_{self.prefix}_…"


# The limits a Limit row can set (besides its scope, client and route).
LIMIT_FIELDS = (
    "requests_per_minute",
    "requests_per_day",
    "tokens_per_minute",
    "tokens_per_day",
    "max_concurrent",
    "usd_per_day",
    "usd_per_month",
)


def scope_constraints(
    prefix: str, *, client_route: StrOrPromise, client: StrOrPromise, route: StrOrPromise
) -> list[models.UniqueConstraint]:
    """One row per scope of a (client, route) pair where either may be empty: limits and
    capture rules are found by their scope (keys.config_io matches them so). The messages
    are whole sentences for each kind of row, so that a translation needs no noun spliced in."""
    return [
        models.UniqueConstraint(
            fields=["client", "route"],
            name=f"{prefix}_client_route",
            condition=models.Q(client__isnull=False, route__isnull=False),
            violation_error_message=client_route,
        ),
        models.UniqueConstraint(
            fields=["client"],
            name=f"{prefix}_client",
            # A NULL client never collides in a unique index: no need to say client is set.
            condition=models.Q(route__isnull=True),
            violation_error_message=client,
        ),
        models.UniqueConstraint(
            fields=["route"],
            name=f"{prefix}_route",
            condition=models.Q(client__isnull=True),
            violation_error_message=route,
        ),
    ]


class Limit(models.Model):
    """Limits on what clients may use: for one client token (any route), one route (any
    client), or one client on one route. Every limit that applies to a request must have room
    for it (keys/limits.py); an empty field is no limit."""

    client = models.ForeignKey(
        ClientToken, null=True, blank=True, on_delete=models.CASCADE, related_name="limits"
    )
    route = models.ForeignKey(
        Route, null=True, blank=True, on_delete=models.CASCADE, related_name="limits"
    )
    requests_per_minute = models.PositiveIntegerField(null=True, blank=True, validators=_AT_LEAST_1)
    requests_per_day = models.PositiveIntegerField(null=True, blank=True, validators=_AT_LEAST_1)
    tokens_per_minute = models.PositiveIntegerField(
        null=True,
        blank=True,
        validators=_AT_LEAST_1,
        help_text=_("Prompt plus completion tokens."),
    )
    tokens_per_day = models.PositiveIntegerField(null=True, blank=True, validators=_AT_LEAST_1)
    max_concurrent = models.PositiveIntegerField(
        _("concurrent requests"), null=True, blank=True, validators=_AT_LEAST_1
    )
    usd_per_day = models.DecimalField(
        _("USD per day"),
        max_digits=12,
        decimal_places=4,
        null=True,
        blank=True,
        validators=[MinValueValidator(Decimal(0))],
    )
    usd_per_month = models.DecimalField(
        _("USD per month"),
        max_digits=12,
        decimal_places=4,
        null=True,
        blank=True,
        validators=[MinValueValidator(Decimal(0))],
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["client__name", "route__name", "id"]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(client__isnull=False) | models.Q(route__isnull=False),
                name="limit_has_scope",
                violation_error_message=_("A limit applies to a client token, a route, or both."),
            ),
            *scope_constraints(
                "limit",
                client_route=_("This client already has a limit on this route."),
                client=_("This client already has a limit on any route."),
                route=_("This route already has a limit for any client."),
            ),
        ]

    def __str__(self) -> str:
        return f"{self.client or 'any client'} on {self.route or 'any route'}"


class CaptureRule(models.Model):
    """What the gateway wire-captures (usage/capture, docs/capture.md): every route and client
    (a rule with neither), one route, one client token, or one client on one route; a share of
    the matching requests (`sample_rate`), until a time or for good. Capture files hold prompts
    and completions: a rule is meant to be narrow and short."""

    client = models.ForeignKey(
        ClientToken, null=True, blank=True, on_delete=models.CASCADE, related_name="capture_rules"
    )
    route = models.ForeignKey(
        Route, null=True, blank=True, on_delete=models.CASCADE, related_name="capture_rules"
    )
    sample_rate = models.FloatField(
        default=1.0,
        validators=[MinValueValidator(0.0), MaxValueValidator(1.0)],
        help_text=_("The share of matching requests captured, from 0 to 1 (1: every one)."),
    )
    until = models.DateTimeField(
        null=True,
        blank=True,
        help_text=_("Capturing stops at this time; empty: until the rule is disabled or deleted."),
    )
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["client__name", "route__name", "id"]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(sample_rate__gte=0.0) & models.Q(sample_rate__lte=1.0),
                name="capture_rate_0_1",
                violation_error_message=_("The sample rate is a share from 0 to 1."),
            ),
            *scope_constraints(
                "capture",
                client_route=_("This client already has a capture rule on this route."),
                client=_("This client already has a capture rule on any route."),
                route=_("This route already has a capture rule for any client."),
            ),
            models.UniqueConstraint(
                models.Value(1),
                name="capture_global",
                condition=models.Q(client__isnull=True, route__isnull=True),
                violation_error_message=_("There already is a capture rule for all traffic."),
            ),
        ]

    def __str__(self) -> str:
        return f"capture {self.client or 'any client'} on {self.route or 'any route'}"


class ReplacementRule(models.Model):
    """A model replacement experiment (docs/replacement.md): a share (`probability`) of a
    route's eligible requests goes first to another model, either a provider's model or
    another route; the rest are the experiment's control group. The route's own deployments
    stay behind the target, so a failing target falls back to them."""

    class Stickiness(models.TextChoices):
        PER_REQUEST = "per_request", _("per request (each request draws again)")
        PER_SESSION = "per_session", _("per session (a replaced session stays replaced)")

    name = models.CharField(
        max_length=64,
        unique=True,
        validators=[slug_validator],
        help_text=_("Names the experiment in records, metrics and the response header."),
    )
    route = models.ForeignKey(Route, on_delete=models.CASCADE, related_name="replacement_rules")
    position = models.PositiveIntegerField(
        default=0,
        help_text=_(
            "Rules of a route are tried in this order; a request belongs to the first whose "
            "conditions it meets."
        ),
    )
    target_provider = models.ForeignKey(
        Provider,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="replacement_rules",
        help_text=_("The replacement: a provider and its model, …"),
    )
    target_model = models.CharField(max_length=200, blank=True, default="")
    target_route = models.ForeignKey(
        Route,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="replacing_rules",
        help_text=_("… or another route (its deployments, in their order)."),
    )
    probability = models.FloatField(
        default=0.1,
        validators=[MinValueValidator(0.0), MaxValueValidator(1.0)],
        help_text=_("The share of eligible requests replaced, from 0 to 1."),
    )
    stickiness = models.CharField(
        max_length=16, choices=Stickiness.choices, default=Stickiness.PER_REQUEST
    )
    sticky_turns = models.PositiveIntegerField(
        default=10,
        validators=[MinValueValidator(1), MaxValueValidator(1000)],
        help_text=_("Per session: a replaced session stays replaced for at most this many turns."),
    )
    min_turn = models.PositiveIntegerField(
        default=0,
        validators=[MaxValueValidator(32767)],
        help_text=_("Only from this turn of a session on (0: any request)."),
    )
    clients = models.JSONField(
        default=list,
        blank=True,
        help_text=_("Only for these client tokens (names); empty: every client."),
    )
    without_tools = models.BooleanField(
        default=False, help_text=_("Only requests that offer no tools.")
    )
    without_images = models.BooleanField(
        default=False, help_text=_("Only requests that carry no images.")
    )
    active_from = models.DateTimeField(null=True, blank=True)
    active_until = models.DateTimeField(null=True, blank=True)
    seed = models.CharField(
        max_length=64,
        blank=True,
        default="",
        help_text=_(
            "Seeds the draw (empty: the rule's name): the same request id or session and seed "
            "always draw the same."
        ),
    )
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["route__name", "position", "name"]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(probability__gte=0.0) & models.Q(probability__lte=1.0),
                name="replacement_probability_0_1",
                violation_error_message=_("The probability is a share from 0 to 1."),
            ),
            models.CheckConstraint(
                condition=(
                    models.Q(target_route__isnull=False, target_provider__isnull=True)
                    | models.Q(target_route__isnull=True, target_provider__isnull=False)
                ),
                name="replacement_one_target",
                violation_error_message=_(
                    "A replacement targets either a provider and model, or another route."
                ),
            ),
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def target_label(self) -> str:
        if self.target_route_id is not None:
            return f"route {self.target_route}"
        return f"{self.target_provider}/{self.target_model}"

    def clean(self) -> None:
        errors: dict[str, str] = {}
        if self.target_provider_id is not None and not self.target_model:
            errors["target_model"] = gettext("A provider target needs the model to send it.")
        if self.target_provider_id is None and self.target_route_id is None:
            errors["target_route"] = gettext(
                "Choose a target: a provider and model, or another route."
            )
        if self.target_provider_id is not None and self.target_route_id is not None:
            errors["target_route"] = gettext("Choose one target: a provider and model, or a route.")
        if self.target_route_id is not None and self.target_route_id == self.route_id:
            errors["target_route"] = gettext("A rule cannot point at its own route.")
        if "*" in self.target_model:
            errors["target_model"] = gettext("A replacement's model is a plain model name.")
        route = getattr(self, "target_route", None)
        if route is not None and "*" in route.name:
            errors["target_route"] = gettext(
                "The target route must be an exact route, not a pattern."
            )
        if self.active_from and self.active_until and self.active_until <= self.active_from:
            errors["active_until"] = gettext("The window ends before it starts.")
        if not isinstance(self.clients, list) or not all(isinstance(c, str) for c in self.clients):
            errors["clients"] = gettext('A list of client token names, e.g. ["ci"].')
        if errors:
            raise ValidationError(errors)
