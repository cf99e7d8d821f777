from django.apps import AppConfig


class DashboardConfig(AppConfig):
    # Installed only for its template tags; the templates live in templates/dashboard/.
    name = "llmrotate_site.dashboard"
    label = "dashboard"
