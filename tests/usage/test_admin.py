"""The admin: call records are read-only evidence, price overrides are editable."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal

import pytest
from django.contrib import admin
from django.contrib.auth.models import AnonymousUser, Permission, User
from django.test import RequestFactory

from usage.admin import CallRecordAdmin, ModelPriceAdmin
from usage.models import CallRecord, ModelPrice


def request_as(user: User | AnonymousUser) -> object:
    request = RequestFactory().get("/admin/")
    request.user = user
    return request


def test_call_records_cannot_be_added_or_changed_and_only_superusers_delete() -> None:
    model_admin = admin.site._registry[CallRecord]
    assert isinstance(model_admin, CallRecordAdmin)
    staff = request_as(User(is_staff=True, is_active=True))
    superuser = request_as(User(is_staff=True, is_active=True, is_superuser=True))
    for request in (staff, superuser):
        assert not model_admin.has_add_permission(request)  # type: ignore[arg-type]
        assert not model_admin.has_change_permission(request)  # type: ignore[arg-type]
    assert not model_admin.has_delete_permission(staff)  # type: ignore[arg-type]
    assert model_admin.has_delete_permission(superuser)  # type: ignore[arg-type]


def test_the_call_record_list_skips_the_full_count_of_a_huge_table() -> None:
    model_admin = admin.site._registry[CallRecord]
    assert model_admin.show_full_result_count is False
    assert model_admin.date_hierarchy == "started_at"
    for column in ("started_at", "request_id", "outcome", "cost_usd", "ttft_ms"):
        assert column in model_admin.list_display


@pytest.mark.django_db
def test_saving_a_price_override_applies_it_after_the_commit(
    django_capture_on_commit_callbacks: Callable[..., object],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    invalidated: list[bool] = []
    monkeypatch.setattr("usage.admin.price_overrides_invalidate", lambda: invalidated.append(True))
    model_admin = admin.site._registry[ModelPrice]
    assert isinstance(model_admin, ModelPriceAdmin)
    price = ModelPrice(model="my-model", input_per_mtok=Decimal("1"), output_per_mtok=Decimal("2"))
    superuser = request_as(User(is_staff=True, is_active=True, is_superuser=True))

    with django_capture_on_commit_callbacks(execute=False) as callbacks:  # type: ignore[attr-defined]
        model_admin.save_model(superuser, price, form=None, change=False)  # type: ignore[arg-type]
    assert not invalidated
    for callback in callbacks:
        callback()
    assert invalidated == [True]


@pytest.mark.django_db
def test_flagged_records_have_a_filter_and_only_users_who_may_change_records_accept_them() -> None:
    model_admin = admin.site._registry[CallRecord]
    assert "usage_flagged" in model_admin.list_filter
    staff = User.objects.create_user("staff", is_staff=True)
    operator = User.objects.create_user("operator", is_staff=True)
    operator.user_permissions.add(Permission.objects.get(codename="change_callrecord"))
    operator = User.objects.get(pk=operator.pk)  # permissions are cached per instance
    assert "accept_flagged_usage" not in model_admin.get_actions(request_as(staff))  # type: ignore[arg-type]
    assert "accept_flagged_usage" in model_admin.get_actions(request_as(operator))  # type: ignore[arg-type]
