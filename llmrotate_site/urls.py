from django.contrib import admin
from django.urls import include, path
from django.views.generic import RedirectView
from django.views.i18n import JavaScriptCatalog

from healthchecks import views as health_views
from llmrotate_site import healthz
from llmrotate_site.api import api

admin.site.site_header = "llmrotate"
admin.site.site_title = "llmrotate admin"
# templates/admin/base_site.html links to the dashboard instead of a "View site".
admin.site.site_url = None

# JSON in the caller's envelope on the API's paths, Django's pages elsewhere.
handler404 = "llmrotate_site.api.page_not_found"
handler400 = "llmrotate_site.api.bad_request"

urlpatterns = [
    path("", RedirectView.as_view(pattern_name="dashboard:overview"), name="home"),
    path("dashboard/", include("llmrotate_site.dashboard.urls")),
    path("admin/", admin.site.urls),
    # The language picker posts to i18n/setlang/ (Django's set_language); the dashboard's
    # scripts take their strings from i18n/js/ (the djangojs catalogue of locale/).
    path("i18n/", include("django.conf.urls.i18n")),
    path("i18n/js/", JavaScriptCatalog.as_view(domain="djangojs"), name="javascript-catalog"),
    path("internal/health", health_views.internal_health, name="internal-health"),
    path("healthz", healthz.healthz, name="healthz"),
    path("", api.urls),
]
