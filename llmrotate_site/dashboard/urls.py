from django.urls import path

from llmrotate_site.dashboard import views

app_name = "dashboard"

urlpatterns = [
    path("", views.page, {"name": "overview"}, name="overview"),
    path("keys/", views.page, {"name": "keys"}, name="keys"),
    path("health/", views.page, {"name": "health"}, name="health"),
    path("calls/", views.page, {"name": "calls"}, name="calls"),
    path("clients/", views.page, {"name": "clients"}, name="clients"),
    path("limits/", views.page, {"name": "limits"}, name="limits"),
    path("experiments/", views.page, {"name": "experiments"}, name="experiments"),
    path("calls/<str:request_id>/", views.call_request, name="request"),
    path("calls/<str:request_id>/capture/", views.call_capture, name="request-capture"),
    path("panels/<slug:name>/", views.panel, name="panel"),
    path("keys/<str:key_id>/admin/", views.key_admin, name="key-admin"),
    path("keys/<str:key_id>/<slug:action>/", views.key_action, name="key-action"),
]
