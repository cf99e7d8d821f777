from typing import Any

from django.apps import AppConfig
from django.utils.translation import gettext_lazy as _


class HealthchecksConfig(AppConfig):
    name = "healthchecks"
    verbose_name = _("Health checks")

    def ready(self) -> None:
        # Budget alerts go out as the signed webhooks health changes use.
        from keys.limits import budget_threshold_reached

        budget_threshold_reached.connect(_budget_alert, dispatch_uid="llmrotate.budget_alert")


def _budget_alert(sender: Any, **kwargs: Any) -> None:
    from healthchecks.notify import budget_alert_notify

    budget_alert_notify(**kwargs)
