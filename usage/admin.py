"""Call records are evidence, so the admin shows them read-only; price overrides are editable.

The records table grows to millions of rows: no full result count, filters on low-cardinality
columns only, and searches on indexed (or prefix-friendly) columns.

The one write on records: accepting usage that was flagged as implausible, which puts its
tokens and cost into the rollups (and so into the dashboards and /api/usage).
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db import transaction
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.translation import gettext_lazy, ngettext

from usage.models import CallRecord, ModelPrice
from usage.pricing import price_overrides_invalidate
from usage.rollups import flagged_usage_accept


@admin.register(CallRecord)
class CallRecordAdmin(admin.ModelAdmin):
    list_display = (
        "started_at",
        "request_id",
        "attempt",
        "client",
        "requested_model",
        "provider",
        "key_id",
        "stream",
        "status_code",
        "outcome",
        "total_tokens",
        "latency_ms",
        "ttft_ms",
        "cost_usd",
    )
    list_filter = ("outcome", "provider", "stream", "usage_source", "usage_flagged")
    search_fields = ("request_id", "key_id", "client", "requested_model")
    date_hierarchy = "started_at"
    # COUNT(*) over millions of rows on every page view is the slow part of a changelist.
    show_full_result_count = False
    list_per_page = 100
    actions = ("accept_flagged_usage",)

    @admin.action(
        description=gettext_lazy("Accept flagged usage (add its tokens and cost to the totals)"),
        permissions=["accept_usage"],
    )
    def accept_flagged_usage(self, request: HttpRequest, queryset: QuerySet[CallRecord]) -> None:
        ids = queryset.filter(usage_flagged=True).values_list("pk", flat=True)
        accepted = flagged_usage_accept(record_ids=ids)
        # The English keeps its "(s)" in both forms; other languages get their plural forms.
        text = ngettext(
            "Accepted the usage of %(count)s flagged call record(s).",
            "Accepted the usage of %(count)s flagged call record(s).",
            accepted,
        )
        self.message_user(request, text % {"count": accepted}, messages.SUCCESS)

    def has_accept_usage_permission(self, request: HttpRequest) -> bool:
        # Records are otherwise read-only for everyone; this changes what every total shows.
        return bool(request.user.is_active and request.user.has_perm("usage.change_callrecord"))

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # Retention is a management command's job; superusers may still remove a bad row.
        return bool(request.user.is_active and request.user.is_superuser)


@admin.register(ModelPrice)
class ModelPriceAdmin(admin.ModelAdmin):
    list_display = (
        "model",
        "provider",
        "input_per_mtok",
        "cached_input_per_mtok",
        "output_per_mtok",
        "updated_at",
    )
    list_filter = ("provider",)
    search_fields = ("model", "provider")

    # Prices are cached for 30 s per process; make edits apply at once in this one. After the
    # commit: the admin saves inside a transaction, and a flusher refreshing before it commits
    # would cache the old price for another 30 s.
    def save_model(self, request: HttpRequest, obj: Any, form: Any, change: bool) -> None:
        super().save_model(request, obj, form, change)
        transaction.on_commit(price_overrides_invalidate)

    def delete_model(self, request: HttpRequest, obj: Any) -> None:
        super().delete_model(request, obj)
        transaction.on_commit(price_overrides_invalidate)

    def delete_queryset(self, request: HttpRequest, queryset: Any) -> None:
        super().delete_queryset(request, queryset)
        transaction.on_commit(price_overrides_invalidate)
