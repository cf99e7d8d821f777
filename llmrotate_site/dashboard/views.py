"""Dashboard views: staff with the monitoring permission only, thin. A page renders its panels
(panels.py); a panel URL renders one panel again for HTMX polling; the request view shows one
request's failover path, and the capture view its wire capture (read from the capture files only
when asked: the request page loads it when its "Wire capture" section is opened); the key
action view runs the admin's disable / enable / reset on one
key."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

from django.conf import settings
from django.contrib import messages
from django.contrib.admin.views.decorators import staff_member_required
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import NoReverseMatch, reverse
from django.utils import timezone
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy
from django.views.decorators.http import require_GET, require_POST

from keys.auth import MONITOR_PERMISSION
from keys.health import MANUAL_ACTIONS
from keys.models import ApiKey
from keys.services import api_key_health_action
from llmrotate_site.dashboard.panels import PANELS
from llmrotate_site.dashboard.query import dashboard_query
from llmrotate_site.viewer import TIME_ZONE_CHOICE_COOKIE
from usage.capture.selectors import capture_status, request_capture
from usage.models import UsageSource
from usage.reconciliation import Reconciliation
from usage.record_selectors import request_attempts

View = Callable[..., HttpResponse]

# Page name -> (title, panels in the order the page shows them).
PAGES: dict[str, tuple[Any, tuple[str, ...]]] = {
    "overview": (
        gettext_lazy("Overview"),
        (
            "providers",
            "summary",
            "timeseries",
            "models",
            "recent",
            "reconciliation",
            "key_table",
        ),
    ),
    "keys": (gettext_lazy("Keys"), ("key_details",)),
    "health": (gettext_lazy("Health"), ("endpoints",)),
    "calls": (gettext_lazy("Calls"), ("calls",)),
    "clients": (gettext_lazy("Clients"), ("clients",)),
    "limits": (gettext_lazy("Limits"), ("limits",)),
    "experiments": (gettext_lazy("Experiments"), ("experiments",)),
}
POLL_SECONDS = 5
ACTION_DONE = {
    "disable": gettext_lazy("%(key)s: disabled."),
    "enable": gettext_lazy("%(key)s: enabled."),
    "reset": gettext_lazy("%(key)s: health reset."),
}


def _is_staff(request: HttpRequest) -> bool:
    return bool(request.user.is_active and request.user.is_staff)


def dashboard_view(view: View) -> View:
    """Staff with MONITOR_PERMISSION only, with the admin's login page. A poll that finds the
    session gone sends the whole tab to the login page (HX-Redirect) instead of swapping the
    login form into a panel. Staff without the permission get a 403, pages and polls alike:
    the login page would only send them back here."""
    protected = staff_member_required(view)

    @wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if _is_staff(request) and not request.user.has_perm(MONITOR_PERMISSION):
            raise PermissionDenied
        if request.headers.get("HX-Request") and not _is_staff(request):
            # Back to the page the poll came from (its path and query, never another host).
            page = urlsplit(request.headers.get("HX-Current-URL", ""))
            back = urlunsplit(("", "", page.path or reverse("dashboard:overview"), page.query, ""))
            login = f"{reverse('admin:login')}?{urlencode({'next': back})}"
            return HttpResponse(headers={"HX-Redirect": login})
        return protected(request, *args, **kwargs)

    return wrapper


def _time_zone(request: HttpRequest) -> dict[str, str]:
    """The zone the page is shown in (llmrotate_site.viewer) and what the viewer chose: their
    browser's zone ("local", the default) or UTC. app.js keeps the cookie in step."""
    name = timezone.get_current_timezone_name()
    choice = "utc" if request.COOKIES.get(TIME_ZONE_CHOICE_COOKIE) == "utc" else "local"
    return {"name": name, "choice": choice}


def _base_context(request: HttpRequest, page: str) -> dict[str, Any]:
    return {
        "q": dashboard_query(request),
        "page": page,
        "nav": [(name, title) for name, (title, _panels) in PAGES.items()],
        "poll_seconds": POLL_SECONDS,
        "time_zone": _time_zone(request),
    }


def _capture_warning() -> dict[str, Any] | None:
    """What every page says while capturing is on or capture files exist (see base.html)."""
    status = capture_status()
    if not status.shown:
        return None
    try:
        rules_url = reverse("admin:keys_capturerule_changelist")
    except NoReverseMatch:  # the admin of capture rules is not registered
        rules_url = None
    return {"status": status, "rules_url": rules_url}


def _page_context(request: HttpRequest, page: str) -> dict[str, Any]:
    """The context of a whole page (not of a poll or a drawer): with the capture warning."""
    return {**_base_context(request, page), "capture_warning": _capture_warning()}


def _panel_context(request: HttpRequest, name: str, context: dict[str, Any]) -> dict[str, Any]:
    # The name goes along so that the partial knows its own polling URL.
    return {"name": name, **PANELS[name](request, context["q"])}


@require_GET
@dashboard_view
def page(request: HttpRequest, name: str) -> HttpResponse:
    title, panel_names = PAGES[name]
    context = _page_context(request, name)
    context["title"] = title
    context["panels"] = {p: _panel_context(request, p, context) for p in panel_names}
    return render(request, f"dashboard/{name}.html", context)


@require_GET
@dashboard_view
def panel(request: HttpRequest, name: str) -> HttpResponse:
    if name not in PANELS:
        raise Http404
    context = _base_context(request, "")
    context["p"] = _panel_context(request, name, context)
    return render(request, f"dashboard/partials/{name}.html", context)


def _prompt_difference(attempt: dict[str, Any]) -> float | None:
    """Reported minus counted prompt tokens in percent of counted, when the upstream reported
    usage and the gateway counted the prompt (the pair the Reconciliation panel sums)."""
    counted = attempt["counted_prompt_tokens"]
    if not counted or attempt["usage_source"] != UsageSource.REPORTED:
        return None
    return Reconciliation(
        compared_reported_prompt_tokens=attempt["prompt_tokens"],
        compared_counted_prompt_tokens=counted,
    ).difference_percent


@require_GET
@dashboard_view
def call_request(request: HttpRequest, request_id: str) -> HttpResponse:
    attempts = request_attempts(request_id=request_id)
    if not attempts:
        raise Http404
    drawer = bool(request.headers.get("HX-Request"))
    context = _base_context(request, "calls") if drawer else _page_context(request, "calls")
    # The row whose answer the client got; a request still being written may not have it yet.
    final = next((a for a in attempts if a["final"]), attempts[-1])
    for a in attempts:
        a["prompt_difference"] = _prompt_difference(a)
    context.update(
        title=_("Request %(id)s") % {"id": request_id},
        request_id=request_id,
        attempts=attempts,
        upstream_attempts=sum(1 for a in attempts if a["attempt"]),
        final=final,
        total_ms=(attempts[-1]["finished_at"] - attempts[0]["started_at"]).total_seconds() * 1000,
        total_tokens=sum(a["total_tokens"] for a in attempts),
        total_cost=sum(a["cost_usd"] or 0 for a in attempts),
        captured=any(a["captured"] for a in attempts),
    )
    # In the calls page's side panel when opened from a row; a whole page when linked to.
    template = "request.html" if drawer else "request_page.html"
    return render(request, f"dashboard/partials/{template}", context)


@require_GET
@dashboard_view
def call_capture(request: HttpRequest, request_id: str) -> HttpResponse:
    """A request's wire capture: the partial the request page loads into its "Wire capture"
    section, or a whole page when linked to (an attempt's "capture" link)."""
    attempts = request_attempts(request_id=request_id)
    if not attempts:
        raise Http404
    capture = request_capture(request_id, records=attempts)
    if request.headers.get("HX-Request"):
        context = _base_context(request, "calls")
        template = "capture.html"
    else:
        context = _page_context(request, "calls")
        template = "capture_page.html"
    context.update(
        title=_("Capture of %(id)s") % {"id": request_id},
        request_id=request_id,
        capture=capture,
        capture_dir=settings.LLMROTATE_CAPTURE_DIR,
    )
    return render(request, f"dashboard/partials/{template}", context)


@require_POST
@dashboard_view
def key_action(request: HttpRequest, key_id: str, action: str) -> HttpResponseRedirect:
    if action not in MANUAL_ACTIONS:
        raise Http404
    # The same permission the admin's actions need.
    if not request.user.has_perm("keys.change_apikey"):
        raise PermissionDenied
    api_key = get_object_or_404(ApiKey, key_id=key_id)
    api_key_health_action(api_key=api_key, action=action)
    messages.success(request, ACTION_DONE[action] % {"key": key_id})
    return redirect(f"{reverse('dashboard:keys')}?{dashboard_query(request).frame_query}")


@require_GET
@dashboard_view
def key_admin(request: HttpRequest, key_id: str) -> HttpResponseRedirect:
    """The admin change page of a key, found by its id (the dashboard only knows ids)."""
    api_key = get_object_or_404(ApiKey, key_id=key_id)
    return redirect("admin:keys_apikey_change", api_key.pk)
