"""Admin for providers, keys, routes, client tokens, limits, capture and replacement rules.

Thin: every write goes through keys.services (which also drops the proxy's routing cache).
Secrets are write-only here: no form, list or change page ever renders a plaintext secret or
its ciphertext, only the masked hint.
"""

from __future__ import annotations

import time
from decimal import Decimal
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator
from django.db import models
from django.db.models import QuerySet
from django.forms import BaseInlineFormSet
from django.http import HttpRequest
from django.urls import reverse
from django.utils import timezone
from django.utils.formats import number_format
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString
from django.utils.timesince import timesince, timeuntil
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy, ngettext, pgettext

from common.timestamps import datetime_from_epoch
from keys.health import KeyState, KeyStatus, ManualAction
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
)
from keys.services import (
    api_key_health_action,
    api_key_parse_secret,
    api_key_save,
    client_token_create,
    client_token_revoke,
    client_token_update,
    invalidate_routing_on_commit,
)
from keys.state_store import get_key_state_store


class InvalidatesRoutingMixin(admin.ModelAdmin):
    """Plain-model admins (providers, routes, limits): save as usual, then drop the routing cache.

    These models have no rules beyond their fields, so a service per model would only forward
    to `save()`; what they do need is the cache invalidation every write must do.
    """

    def save_related(self, request: HttpRequest, form: Any, formsets: Any, change: bool) -> None:
        # After the inlines, so the reload sees the whole change (a route and its deployments).
        super().save_related(request, form, formsets, change)
        invalidate_routing_on_commit()

    def delete_model(self, request: HttpRequest, obj: Any) -> None:
        super().delete_model(request, obj)
        invalidate_routing_on_commit()

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        super().delete_queryset(request, queryset)
        invalidate_routing_on_commit()


# ---------------------------------------------------------------------------------------------
# Providers


@admin.register(Provider)
class ProviderAdmin(InvalidatesRoutingMixin):
    list_display = ["name", "kind", "base_url", "enabled", "key_count"]
    list_filter = ["kind", "enabled"]
    search_fields = ["name", "base_url"]
    # A base URL typed without a scheme is taken as https (Django 6's default, chosen now).
    formfield_overrides = {models.URLField: {"assume_scheme": "https"}}

    @admin.display(description=gettext_lazy("keys"))
    def key_count(self, obj: Provider) -> int:
        return obj.keys.count()


# ---------------------------------------------------------------------------------------------
# API keys


class ModelListField(forms.CharField):
    """`allowed_models` as text: one model per line or comma-separated; empty means all."""

    widget = forms.Textarea(attrs={"rows": 3})

    def prepare_value(self, value: Any) -> Any:
        if isinstance(value, list):
            return "\n".join(value)
        return value

    def to_python(self, value: Any) -> list[str]:  # type: ignore[override]
        text = super().to_python(value) or ""
        return [m.strip() for m in text.replace(",", "\n").splitlines() if m.strip()]


def _at_least_one(field: forms.Field) -> None:
    # The columns take 0, which would refuse every request, as the config file refuses it.
    field.validators.append(MinValueValidator(1))
    field.widget.attrs["min"] = 1


class ApiKeyForm(forms.ModelForm):
    secret = forms.CharField(
        label=gettext_lazy("Secret"),
        required=False,
        strip=True,
        # render_value=False: after a failed submit the page comes back without the secret.
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
        help_text=gettext_lazy(
            "The provider's API key, stored encrypted; or env://NAME or file://path to keep it "
            "out of the database. Leave empty to keep the current secret."
        ),
    )
    allowed_models = ModelListField(
        label=gettext_lazy("Models"),
        required=False,
        help_text=gettext_lazy(
            "Upstream models this key may serve, one per line. Empty means all."
        ),
    )

    class Meta:
        model = ApiKey
        fields = [
            "key_id",
            "provider",
            "secret",
            "enabled",
            "priority",
            "weight",
            "allowed_models",
            "requests_per_minute",
            "tokens_per_minute",
        ]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for name in ("requests_per_minute", "tokens_per_minute"):
            _at_least_one(self.fields[name])
        if self.instance.pk is None:
            self.fields["secret"].required = True
            self.fields["secret"].help_text = _(
                "The provider's API key, stored encrypted; or env://NAME or file://path to keep "
                "it out of the database."
            )

    def clean_secret(self) -> str:
        secret: str = self.cleaned_data.get("secret") or ""
        if secret:
            # Syntax only; a reference that does not resolve here is a warning after saving.
            api_key_parse_secret(secret=secret)
        return secret


def _relative(epoch: float | None, now: float) -> str:
    if not epoch:
        return "—"
    moment = datetime_from_epoch(epoch)
    reference = datetime_from_epoch(now)
    if moment is None or reference is None:
        return "—"
    if epoch >= now:
        return _("in %(span)s") % {"span": timeuntil(moment, reference)}
    return _("%(span)s ago") % {"span": timesince(moment, reference)}


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    form = ApiKeyForm
    list_display = [
        "key_id",
        "provider",
        "secret_hint",
        "enabled",
        "priority",
        "weight",
        "provider_limits",
        "health_status",
        "benched_until",
        "consecutive_failures",
        "last_error",
    ]
    list_filter = ["provider", "enabled"]
    search_fields = ["key_id"]
    list_select_related = ["provider"]
    readonly_fields = ["secret_hint", "health_status", "benched_until", "last_error"]
    actions = ["disable_keys", "enable_keys", "reset_health"]

    def get_fieldsets(self, request: HttpRequest, obj: ApiKey | None = None) -> Any:
        provider_limits = (
            _("Provider limits"),
            {
                "fields": ("requests_per_minute", "tokens_per_minute"),
                "description": _(
                    "The provider's own limits for this key, when known: the gateway keeps the "
                    "key under them instead of waiting for a 429. Empty: not known."
                ),
            },
        )
        if obj is None:
            fields = ["key_id", "provider", "secret", "enabled", "priority", "weight"]
            return [(None, {"fields": [*fields, "allowed_models"]}), provider_limits]
        # The masked hint next to the (empty) secret box, and the live health below.
        fields = ["key_id", "provider", "secret", "secret_hint", "enabled", "priority", "weight"]
        return [
            (None, {"fields": [*fields, "allowed_models"]}),
            provider_limits,
            (_("Health"), {"fields": ("health_status", "benched_until", "last_error")}),
        ]

    def get_changelist_instance(self, request: HttpRequest) -> Any:
        changelist = super().get_changelist_instance(request)
        # One store round trip for the whole page rather than one (or four) per row; kept on
        # the row objects, not on this admin, which every request shares.
        rows = list(changelist.result_list)
        states = get_key_state_store().get_many([k.key_id for k in rows], now=time.time())
        for key in rows:
            key._health = states.get(key.key_id)
        return changelist

    def _health(self, obj: ApiKey) -> KeyState | None:
        cached = getattr(obj, "_health", None)
        if cached is None and obj.pk is not None:
            # Change form: one key, one call.
            cached = get_key_state_store().get_many([obj.key_id], now=time.time())[obj.key_id]
            obj._health = cached  # type: ignore[attr-defined]
        return cached[0] if cached else None

    @admin.display(description=gettext_lazy("provider limits"))
    def provider_limits(self, obj: ApiKey) -> str:
        parts = [
            text % {"count": number_format(value, force_grouping=True)}
            for value, text in (
                (obj.requests_per_minute, _("%(count)s req/min")),
                (obj.tokens_per_minute, _("%(count)s tok/min")),
            )
            if value is not None
        ]
        return ", ".join(parts) or "—"

    @admin.display(description=gettext_lazy("health"))
    def health_status(self, obj: ApiKey) -> str:
        state = self._health(obj)
        return state.status.value if state else "—"

    # Translators: heads the column of when a benched key is back in rotation.
    @admin.display(description=gettext_lazy("back"))
    def benched_until(self, obj: ApiKey) -> str:
        state = self._health(obj)
        if state is None:
            return "—"
        until = {
            KeyStatus.COOLDOWN: max(state.cooldown_until, state.exhausted_until),
            KeyStatus.EXHAUSTED: max(state.exhausted_until, state.cooldown_until),
            KeyStatus.QUARANTINED: state.quarantine_until,
        }.get(state.status)
        if until is None:
            return "—"
        text = _relative(until, time.time())
        if state.status == KeyStatus.QUARANTINED:
            # Quarantine ends by a successful re-check, not by the clock alone.
            text = _("re-check %(when)s") % {"when": text}
        return text

    @admin.display(description=gettext_lazy("failures in a row"))
    def consecutive_failures(self, obj: ApiKey) -> int | str:
        state = self._health(obj)
        return state.consecutive_failures if state else "—"

    @admin.display(description=gettext_lazy("last error"))
    def last_error(self, obj: ApiKey) -> str:
        state = self._health(obj)
        if state is None or not state.last_error_type:
            return "—"
        return f"{state.last_error_type} ({_relative(state.last_used_at, time.time())})"

    def save_model(self, request: HttpRequest, obj: ApiKey, form: Any, change: bool) -> None:
        warnings = api_key_save(api_key=obj, secret=form.cleaned_data.get("secret") or None)
        for warning in warnings:
            messages.warning(request, warning)

    def delete_model(self, request: HttpRequest, obj: ApiKey) -> None:
        super().delete_model(request, obj)
        invalidate_routing_on_commit()

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        super().delete_queryset(request, queryset)
        invalidate_routing_on_commit()

    def _health_action(
        self, request: HttpRequest, queryset: QuerySet[ApiKey], action: ManualAction, done: str
    ) -> None:
        """`done`: the message, with the key ids in its `%(keys)s`."""
        keys = list(queryset)
        for key in keys:
            api_key_health_action(api_key=key, action=action)
        self.message_user(request, done % {"keys": ", ".join(k.key_id for k in keys)})

    @admin.action(description=gettext_lazy("Disable selected keys"))
    def disable_keys(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        self._health_action(request, queryset, "disable", _("Disabled: %(keys)s"))

    @admin.action(description=gettext_lazy("Enable selected keys"))
    def enable_keys(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        self._health_action(request, queryset, "enable", _("Enabled: %(keys)s"))

    @admin.action(description=gettext_lazy("Reset health of selected keys"))
    def reset_health(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        self._health_action(request, queryset, "reset", _("Health reset: %(keys)s"))


# ---------------------------------------------------------------------------------------------
# Routes


class DeploymentFormSet(BaseInlineFormSet):
    def clean(self) -> None:
        super().clean()
        positions = [
            form.cleaned_data["position"]
            for form in self.forms
            if form.cleaned_data and not form.cleaned_data.get("DELETE")
        ]
        if len(positions) != len(set(positions)):
            raise ValidationError(_("Each deployment needs its own position."))


class DeploymentInline(admin.TabularInline):
    model = Deployment
    formset = DeploymentFormSet
    fields = ["position", "provider", "model"]
    ordering = ["position"]
    extra = 1


@admin.register(Route)
class RouteAdmin(InvalidatesRoutingMixin):
    list_display = ["name", "strategy", "enabled", "chain"]
    list_filter = ["strategy", "enabled"]
    search_fields = ["name"]
    inlines = [DeploymentInline]

    def get_readonly_fields(self, request: HttpRequest, obj: Route | None = None) -> Any:
        # Listed, not edited inline: every POST of this page would then need the limits'
        # formset too, and a limit has its own page (with the checks of its scope).
        return () if obj is None else ("limits",)

    @admin.display(description=gettext_lazy("limits"))
    def limits(self, obj: Route) -> SafeString:
        return _limit_links(obj.limits.select_related("client", "route"), add={"route": obj.pk})

    def get_queryset(self, request: HttpRequest) -> QuerySet[Route]:
        return super().get_queryset(request).prefetch_related("deployments__provider")

    @admin.display(description=gettext_lazy("fallback chain"))
    def chain(self, obj: Route) -> str:
        return " → ".join(str(d) for d in obj.deployments.all()) or "—"


# ---------------------------------------------------------------------------------------------
# Client tokens


class RouteListField(forms.CharField):
    def prepare_value(self, value: Any) -> Any:
        if isinstance(value, list):
            return ", ".join(value)
        return value

    def to_python(self, value: Any) -> list[str]:  # type: ignore[override]
        text = super().to_python(value) or ""
        return [r.strip() for r in text.replace("\n", ",").split(",") if r.strip()]


class ClientTokenForm(forms.ModelForm):
    routes = RouteListField(
        label=gettext_lazy("Routes"),
        initial=["*"],
        help_text=gettext_lazy("Route names this token may use, comma-separated; * for all."),
    )
    scopes = forms.MultipleChoiceField(
        label=gettext_lazy("Scopes"),
        choices=ClientToken.Scope.choices,
        initial=[ClientToken.Scope.PROXY.value],
        widget=forms.CheckboxSelectMultiple,
    )

    class Meta:
        model = ClientToken
        fields = ["name", "routes", "scopes", "never_replace", "expires_at"]


@admin.register(ClientToken)
class ClientTokenAdmin(admin.ModelAdmin):
    form = ClientTokenForm
    list_display = [
        "name",
        "masked",
        "routes",
        "scopes",
        "never_replace",
        "expires_at",
        "revoked_at",
        "created_at",
    ]
    list_filter = [("revoked_at", admin.EmptyFieldListFilter), "never_replace"]
    search_fields = ["name", "prefix"]
    actions = ["revoke_tokens"]

    def get_fields(self, request: HttpRequest, obj: ClientToken | None = None) -> tuple[str, ...]:
        if obj is None:
            return ("name", "routes", "scopes", "never_replace", "expires_at")
        return (
            "name",
            "masked",
            "routes",
            "scopes",
            "never_replace",
            "expires_at",
            "limits",
            "revoked_at",
            "created_at",
        )

    def get_readonly_fields(
        self, request: HttpRequest, obj: ClientToken | None = None
    ) -> tuple[str, ...]:
        if obj is None:
            return ()
        # Records and config files refer to a client by name: a new name is a new client.
        return ("name", "masked", "limits", "revoked_at", "created_at")

    @admin.display(description=gettext_lazy("token"))
    def masked(self, obj: ClientToken) -> str:
        return obj.masked

    @admin.display(description=gettext_lazy("limits"))
    def limits(self, obj: ClientToken) -> SafeString:
        # Listed here, edited on their own page: see RouteAdmin.get_readonly_fields.
        return _limit_links(obj.limits.select_related("client", "route"), add={"client": obj.pk})

    def save_model(self, request: HttpRequest, obj: ClientToken, form: Any, change: bool) -> None:
        data = form.cleaned_data
        if change:
            client_token_update(
                client_token=obj,
                routes=data["routes"],
                scopes=data["scopes"],
                never_replace=data["never_replace"],
                expires_at=data["expires_at"],
            )
            return
        created, token = client_token_create(
            name=data["name"],
            routes=data["routes"],
            scopes=data["scopes"],
            never_replace=data["never_replace"],
            expires_at=data["expires_at"],
        )
        # The admin goes on with `obj` (log entry, redirect); make it the saved row.
        obj.pk, obj.prefix, obj.token_hash = created.pk, created.prefix, created.token_hash
        obj.created_at = created.created_at
        obj._state.adding = False
        # The only time the token exists outside the caller's hands: only its hash is kept.
        messages.success(
            request,
            _("Token for “%(name)s”: %(token)s — copy it now: it cannot be shown again.")
            % {"name": created.name, "token": token},
        )

    def delete_model(self, request: HttpRequest, obj: ClientToken) -> None:
        super().delete_model(request, obj)
        invalidate_routing_on_commit()

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[ClientToken]) -> None:
        super().delete_queryset(request, queryset)
        invalidate_routing_on_commit()

    @admin.action(description=gettext_lazy("Revoke selected tokens"))
    def revoke_tokens(self, request: HttpRequest, queryset: QuerySet[ClientToken]) -> None:
        tokens = list(queryset)
        for token in tokens:
            client_token_revoke(token=token)
        self.message_user(
            request, _("Revoked: %(tokens)s") % {"tokens": ", ".join(t.name for t in tokens)}
        )


# ---------------------------------------------------------------------------------------------
# Limits


def _usd(value: Decimal) -> str:
    text = f"{value.normalize():f}"
    whole, _dot, cents = text.partition(".")
    return f"${whole}.{cents.ljust(2, '0')}"


def limit_summary(limit: Limit) -> str:
    """The limits a row sets, in one line: `60 req/min, 5,000 tok/day, $5.00/day`."""
    counts = [
        (limit.requests_per_minute, _("%(count)s req/min")),
        (limit.requests_per_day, _("%(count)s req/day")),
        (limit.tokens_per_minute, _("%(count)s tok/min")),
        (limit.tokens_per_day, _("%(count)s tok/day")),
        (limit.max_concurrent, _("%(count)s concurrent")),
    ]
    parts = [
        text % {"count": number_format(value, force_grouping=True)}
        for value, text in counts
        if value is not None
    ]
    spend = [(limit.usd_per_day, _("%(usd)s/day")), (limit.usd_per_month, _("%(usd)s/month"))]
    parts += [text % {"usd": _usd(value)} for value, text in spend if value is not None]
    return ", ".join(parts) or _("no limit set")


def _scope_name(limit: Limit) -> str:
    client = limit.client.name if limit.client else ""
    route = limit.route.name if limit.route else ""
    if client and route:
        return _("%(client)s on %(route)s") % {"client": client, "route": route}
    if client:
        return _("%(client)s on any route") % {"client": client}
    if route:
        return _("any client on %(route)s") % {"route": route}
    return _("any client on any route")


def _limit_links(limits: QuerySet[Limit], *, add: dict[str, int]) -> SafeString:
    rows = format_html_join(
        "",
        '<li><a href="{}">{}</a>: {}</li>',
        (
            (
                reverse("admin:keys_limit_change", args=[lim.pk]),
                _scope_name(lim),
                limit_summary(lim),
            )
            for lim in limits
        ),
    )
    query = "&".join(f"{name}={pk}" for name, pk in add.items())
    add_url = f"{reverse('admin:keys_limit_add')}?{query}"
    if not rows:
        return format_html('{} <a href="{}">{}</a>', _("None."), add_url, _("Add a limit"))
    return format_html('<ul>{}</ul><a href="{}">{}</a>', rows, add_url, _("Add a limit"))


_LIMIT_COUNTS = [
    "requests_per_minute",
    "requests_per_day",
    "tokens_per_minute",
    "tokens_per_day",
    "max_concurrent",
]


class ScopeColumnsMixin(InvalidatesRoutingMixin):
    """The client and route columns of a row scoped to either, both or neither (limits and
    capture rules)."""

    @admin.display(description=gettext_lazy("client"), ordering="client__name")
    def client_name(self, obj: Limit | CaptureRule) -> str:
        # The context: "any" may take the gender of "client" or "route" in a translation.
        return obj.client.name if obj.client else pgettext("any client", "any")

    @admin.display(description=gettext_lazy("route"), ordering="route__name")
    def route_name(self, obj: Limit | CaptureRule) -> str:
        return obj.route.name if obj.route else pgettext("any route", "any")


class LimitForm(forms.ModelForm):
    class Meta:
        model = Limit
        fields = ["client", "route", *LIMIT_FIELDS]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for name in _LIMIT_COUNTS:
            _at_least_one(self.fields[name])

    def clean(self) -> dict[str, Any]:
        super().clean()
        data = self.cleaned_data
        client, route = data.get("client"), data.get("route")
        if client is None and route is None:
            return data  # the model's own check says so
        same = Limit.objects.filter(client=client, route=route).exclude(pk=self.instance.pk)
        if same.exists():
            # On a field, so that Django's own "Constraint … is violated" (its unique
            # constraints have conditions, so no better wording) is skipped for it.
            names = {"client": str(client), "route": str(route)}
            if client and route:
                message = _(
                    "There is already a limit for “%(client)s” on “%(route)s”: change that one "
                    "instead."
                )
            elif client:
                message = _(
                    "There is already a limit for “%(client)s” on any route: change that one "
                    "instead."
                )
            else:
                message = _(
                    "There is already a limit for any client on “%(route)s”: change that one "
                    "instead."
                )
            self.add_error("route" if route else "client", message % names)
        return data


@admin.register(Limit)
class LimitAdmin(ScopeColumnsMixin):
    form = LimitForm
    list_display = ["client_name", "route_name", "summary", "updated_at"]
    list_select_related = ["client", "route"]
    search_fields = ["client__name", "route__name"]
    fieldsets = [
        (
            None,
            {
                "fields": ("client", "route"),
                "description": gettext_lazy(
                    "A client token on any route, a route for all its clients, or one client on "
                    "one route. Every limit that applies to a request must have room for it. An "
                    "empty field is no limit."
                ),
            },
        ),
        (gettext_lazy("Requests"), {"fields": ("requests_per_minute", "requests_per_day")}),
        (
            gettext_lazy("Tokens"),
            {
                "fields": ("tokens_per_minute", "tokens_per_day"),
                "description": gettext_lazy(
                    "Prompt plus completion tokens, reserved before the call and settled from "
                    "the usage the upstream reports."
                ),
            },
        ),
        (gettext_lazy("Concurrency"), {"fields": ("max_concurrent",)}),
        (
            gettext_lazy("Spend (USD)"),
            {
                "fields": ("usd_per_day", "usd_per_month"),
                "description": gettext_lazy(
                    "Days and calendar months of LLMROTATE_LIMITS_TIME_ZONE."
                ),
            },
        ),
    ]

    @admin.display(description=gettext_lazy("limits"))
    def summary(self, obj: Limit) -> str:
        return limit_summary(obj)


# ---------------------------------------------------------------------------------------------
# Capture rules

# "Capture this client for 15 minutes": a rule's end, picked relative to when it is saved.
CAPTURE_DURATIONS = [
    ("", gettext_lazy("keep the end below (or none)")),
    ("15", gettext_lazy("for 15 minutes from now")),
    ("60", gettext_lazy("for 1 hour from now")),
    ("1440", gettext_lazy("for 24 hours from now")),
]


class CaptureRuleForm(forms.ModelForm):
    capture_for = forms.ChoiceField(
        choices=CAPTURE_DURATIONS,
        required=False,
        label=gettext_lazy("Capture"),
        help_text=gettext_lazy("Sets the end time from now; a capture rule is best kept short."),
    )

    class Meta:
        model = CaptureRule
        fields = ["client", "route", "sample_rate", "capture_for", "until", "enabled"]

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or {}
        minutes = cleaned.get("capture_for")
        if minutes:
            cleaned["until"] = datetime_from_epoch(time.time() + int(minutes) * 60)
            self.instance.until = cleaned["until"]
        return cleaned


@admin.register(CaptureRule)
class CaptureRuleAdmin(ScopeColumnsMixin):
    form = CaptureRuleForm
    list_display = ["client_name", "route_name", "sample_rate", "state", "until", "enabled"]
    list_select_related = ["client", "route"]
    list_filter = ["enabled"]
    actions = ["stop_now", "extend_15_minutes"]
    fieldsets = [
        (
            None,
            {
                "fields": ("client", "route", "sample_rate", "capture_for", "until", "enabled"),
                "description": gettext_lazy(
                    "Wire capture records the chosen requests exactly as they crossed the wire, "
                    "prompts and completions included (credentials masked), in files under "
                    "LLMROTATE_CAPTURE_DIR that whoever can read that folder can read. Leave "
                    "client and route empty to capture all traffic. See docs/capture.md."
                ),
            },
        ),
    ]

    # Translators: heads the column of what a capture rule is doing at present.
    @admin.display(description=gettext_lazy("now"))
    def state(self, obj: CaptureRule) -> str:
        if not obj.enabled or obj.sample_rate <= 0:
            return _("off")
        if obj.until is None:
            return _("capturing, no end")
        if obj.until.timestamp() <= time.time():
            return _("ended")
        return _("capturing, ends in %(span)s") % {"span": timeuntil(obj.until)}

    @admin.action(description=gettext_lazy("Stop capturing now"))
    def stop_now(self, request: HttpRequest, queryset: QuerySet[CaptureRule]) -> None:
        count = queryset.update(enabled=False)
        invalidate_routing_on_commit()
        # The English keeps its "(s)" in both forms; other languages get their plural forms.
        text = ngettext(
            "%(count)s capture rule(s) stopped.", "%(count)s capture rule(s) stopped.", count
        )
        self.message_user(request, text % {"count": count}, messages.SUCCESS)

    @admin.action(description=gettext_lazy("Capture for 15 more minutes"))
    def extend_15_minutes(self, request: HttpRequest, queryset: QuerySet[CaptureRule]) -> None:
        count = 0
        for rule in queryset:
            start = max(time.time(), rule.until.timestamp() if rule.until else 0.0)
            rule.until = datetime_from_epoch(start + 15 * 60)
            rule.enabled = True
            rule.save(update_fields=["until", "enabled", "updated_at"])
            count += 1
        invalidate_routing_on_commit()
        text = ngettext(
            "%(count)s capture rule(s) extended.", "%(count)s capture rule(s) extended.", count
        )
        self.message_user(request, text % {"count": count}, messages.SUCCESS)


# ---------------------------------------------------------------------------------------------
# Replacement rules


class ReplacementRuleForm(forms.ModelForm):
    clients = RouteListField(
        required=False,
        label=gettext_lazy("Clients"),
        help_text=gettext_lazy(
            "Only for these client tokens (names), comma-separated; empty: every client."
        ),
    )

    class Meta:
        model = ReplacementRule
        fields = [
            "name",
            "route",
            "position",
            "target_provider",
            "target_model",
            "target_route",
            "probability",
            "stickiness",
            "sticky_turns",
            "min_turn",
            "clients",
            "without_tools",
            "without_images",
            "active_from",
            "active_until",
            "seed",
            "enabled",
        ]

    def clean_clients(self) -> list[str]:
        names: list[str] = self.cleaned_data.get("clients") or []
        known = set(ClientToken.objects.filter(name__in=names).values_list("name", flat=True))
        unknown = [name for name in names if name not in known]
        if unknown:
            # A misspelt name would silently match nobody; the config file refuses it too.
            raise ValidationError(_("Unknown client: %(names)s.") % {"names": ", ".join(unknown)})
        return names


@admin.register(ReplacementRule)
class ReplacementRuleAdmin(InvalidatesRoutingMixin):
    form = ReplacementRuleForm
    list_display = [
        "name",
        "route",
        "target",
        "probability",
        "stickiness",
        "enabled",
        "window",
    ]
    list_select_related = ["route", "target_provider", "target_route"]
    list_filter = ["enabled", "stickiness", "route"]
    search_fields = ["name", "route__name", "target_model", "target_route__name"]
    actions = ["enable_rules", "disable_rules"]
    fieldsets = [
        (
            None,
            {
                "fields": ("name", "route", "position", "enabled"),
                "description": gettext_lazy(
                    "An experiment sends a share of a route's requests to another model first "
                    "(a provider's model, or another route), and keeps the rest as its control "
                    "group; the route's own deployments stay behind the target, so a failing "
                    "target falls back to them. Records, metrics and the response header name "
                    "the rule. Clients opt out with the X-LLMRotate-No-Replace: 1 header, or a "
                    "token marked “never replace”. See docs/replacement.md."
                ),
            },
        ),
        (
            gettext_lazy("Target"),
            {
                "fields": ("target_provider", "target_model", "target_route"),
                "description": gettext_lazy(
                    "Either a provider and its model, or another (exact) route."
                ),
            },
        ),
        (gettext_lazy("Draw"), {"fields": ("probability", "stickiness", "sticky_turns", "seed")}),
        (
            gettext_lazy("Conditions"),
            {
                "fields": (
                    "min_turn",
                    "clients",
                    "without_tools",
                    "without_images",
                    "active_from",
                    "active_until",
                ),
                "description": gettext_lazy(
                    "A request is eligible when it meets all of them; empty fields set no "
                    "condition."
                ),
            },
        ),
    ]

    @admin.display(description=gettext_lazy("target"))
    def target(self, obj: ReplacementRule) -> str:
        return obj.target_label

    @admin.display(description=gettext_lazy("active window"))
    def window(self, obj: ReplacementRule) -> str:
        start, end = obj.active_from, obj.active_until
        if start is None and end is None:
            return _("always")

        def moment(value: Any) -> str:
            return timezone.localtime(value).strftime("%Y-%m-%d %H:%M") if value else "…"

        now = timezone.now()
        window = f"{moment(start)} → {moment(end)}"
        if end is not None and end <= now:
            return _("%(window)s (ended)") % {"window": window}
        if start is not None and start > now:
            span = timeuntil(start, now)
            return _("%(window)s (starts in %(span)s)") % {"window": window, "span": span}
        return window

    def _set_enabled(
        self, request: HttpRequest, queryset: QuerySet[ReplacementRule], enabled: bool
    ) -> None:
        # update() skips auto_now, hence updated_at by hand.
        count = queryset.update(enabled=enabled, updated_at=timezone.now())
        invalidate_routing_on_commit()
        if enabled:
            text = ngettext(
                "%(count)s replacement rule(s) enabled.",
                "%(count)s replacement rule(s) enabled.",
                count,
            )
        else:
            text = ngettext(
                "%(count)s replacement rule(s) disabled.",
                "%(count)s replacement rule(s) disabled.",
                count,
            )
        self.message_user(request, text % {"count": count}, messages.SUCCESS)

    @admin.action(description=gettext_lazy("Enable selected rules"))
    def enable_rules(self, request: HttpRequest, queryset: QuerySet[ReplacementRule]) -> None:
        self._set_enabled(request, queryset, True)

    @admin.action(description=gettext_lazy("Disable selected rules"))
    def disable_rules(self, request: HttpRequest, queryset: QuerySet[ReplacementRule]) -> None:
        self._set_enabled(request, queryset, False)
