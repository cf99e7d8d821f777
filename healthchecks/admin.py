"""Admin for endpoints (probe settings, breaker state, recent probe results) and probe results.

Endpoints appear by themselves as providers are added (the probe dispatcher syncs them), so
they cannot be added here, only tuned. The beat schedule is django-celery-beat's admin
("Periodic tasks"), where entries can be switched off.
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db import models
from django.db.models import QuerySet
from django.http import HttpRequest
from django.urls import reverse
from django.utils import timezone
from django.utils.formats import number_format
from django.utils.html import format_html, format_html_join
from django.utils.timesince import timeuntil
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy, ngettext

from common.timestamps import datetime_from_epoch
from healthchecks.breaker import BreakerStatus
from healthchecks.models import Endpoint, HealthEvent
from healthchecks.selectors import breaker_state_of, health_events_recent
from healthchecks.services import breaker_reset
from keys.models import Provider

HTTP_FIELDS: list[str | list[str] | tuple[str, ...] | tuple[()]] = [
    "http_enabled",
    "http_interval_seconds",
    "http_failure_threshold",
    "http_url",
    "http_expected_status",
    "http_timeout_seconds",
]
RESULT_FIELDS: list[str | list[str] | tuple[str, ...] | tuple[()]] = [
    "health",
    "ping_status",
    "http_status",
    "ping_failures",
    "http_failures",
    "last_latency_ms",
    "last_checked_at",
    "last_change_at",
    "recent_events",
]


def _timeuntil_epoch(epoch: float) -> str:
    moment = datetime_from_epoch(epoch)
    return timeuntil(moment) if moment else "—"


@admin.register(Endpoint)
class EndpointAdmin(admin.ModelAdmin):
    list_display = [
        "base_url",
        "providers",
        "health",
        "breaker",
        "ping_status",
        "http_status",
        "failures",
        "last_latency_ms",
        "last_checked_at",
    ]
    list_filter = ["enabled", "is_up", "ping_status", "http_status"]
    search_fields = ["base_url"]
    actions = ["reset_breakers"]
    formfield_overrides = {models.URLField: {"assume_scheme": "https"}}
    fieldsets = [
        (None, {"fields": ["base_url", "providers", "enabled", "breaker"]}),
        (
            gettext_lazy("Ping"),
            {"fields": ["ping_enabled", "ping_interval_seconds", "ping_failure_threshold"]},
        ),
        (gettext_lazy("HTTP probe"), {"fields": HTTP_FIELDS}),
        (gettext_lazy("Last results"), {"fields": RESULT_FIELDS}),
    ]
    readonly_fields = ["base_url", "providers", "breaker", *map(str, RESULT_FIELDS)]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    @admin.display(description=gettext_lazy("providers"))
    def providers(self, obj: Endpoint) -> str:
        names = Provider.objects.filter(base_url__in=[obj.base_url, obj.base_url + "/"])
        return ", ".join(names.values_list("name", flat=True)) or "-"

    @admin.display(description=gettext_lazy("consecutive failures (ping / HTTP)"))
    def failures(self, obj: Endpoint) -> str:
        return f"{obj.ping_failures} / {obj.http_failures}"

    @admin.display(description=gettext_lazy("circuit breaker"))
    def breaker(self, obj: Endpoint) -> str:
        state = breaker_state_of(endpoint=obj.base_url)
        if state.status == BreakerStatus.OPEN:
            return _("open (half-open in %(span)s): %(reason)s") % {
                "span": _timeuntil_epoch(state.open_until),
                "reason": state.reason,
            }
        if state.status == BreakerStatus.HALF_OPEN:
            return _("half-open: %(reason)s") % {"reason": state.reason}
        return _("closed")

    @admin.display(description=gettext_lazy("recent probe results"))
    def recent_events(self, obj: Endpoint) -> str:
        events = health_events_recent(endpoint=obj)
        url = reverse("admin:healthchecks_healthevent_changelist")
        rows = format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            (
                (
                    timezone.localtime(e.created_at).strftime("%Y-%m-%d %H:%M:%S"),
                    e.kind,
                    e.status,
                    e.status_code or "",
                    f"{number_format(e.latency_ms, 1)} ms" if e.latency_ms else "",
                    e.error,
                )
                for e in events
            ),
        )
        heads = format_html_join(
            "",
            "<th>{}</th>",
            # Translators: "at" heads the column of each probe's time ("HTTP": its status code).
            ((_("at"),), (_("probe"),), (_("status"),), ("HTTP",), (_("latency"),), (_("error"),)),
        )
        return format_html(
            '<table><tr>{}</tr>{}</table><a href="{}?endpoint__id__exact={}">{}</a>',
            heads,
            rows,
            url,
            obj.pk,
            _("all results"),
        )

    @admin.action(description=gettext_lazy("Close the circuit breaker of the selected endpoints"))
    def reset_breakers(self, request: HttpRequest, queryset: QuerySet[Endpoint]) -> None:
        for endpoint in queryset:
            breaker_reset(endpoint=endpoint.base_url)
        count = queryset.count()
        # The English keeps its "(s)" in both forms; other languages get their plural forms.
        text = ngettext("Closed %(count)s breaker(s).", "Closed %(count)s breaker(s).", count)
        self.message_user(request, text % {"count": count}, messages.SUCCESS)


@admin.register(HealthEvent)
class HealthEventAdmin(admin.ModelAdmin):
    list_display = [
        "created_at",
        "endpoint",
        "kind",
        "status",
        "status_code",
        "latency_ms",
        "error",
    ]
    list_filter = ["kind", "status", "endpoint"]
    date_hierarchy = "created_at"
    list_select_related = ["endpoint"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
