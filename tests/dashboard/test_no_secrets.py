"""No page of the dashboard, and no panel or request it polls, shows an upstream key or a
client token: only their masked forms. Rendered for the seeded gateway (tests/dashboard/seed.py),
whose every secret is known here, in both legs."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import User
from django.test import Client

from llmrotate_site.dashboard.panels import PANELS
from tests.dashboard.seed import dashboard_seed
from usage.models import CallRecord

pytestmark = pytest.mark.django_db(transaction=True)


def test_no_page_shows_a_seeded_key_or_token_unmasked(client: Client) -> None:
    seeded = dashboard_seed(upstream_url="http://127.0.0.1:9/v1", records=800)
    client.force_login(User.objects.create_superuser("ops", "ops@example.com", "pw"))
    requests = CallRecord.objects.order_by("-attempt", "-started_at")
    failover = list(requests.values_list("request_id", flat=True)[:3])
    urls = [
        *(f"/dashboard/{page}?window=30d" for page in ("", "keys/", "health/", "calls/",
                                                        "clients/")),
        *(f"/dashboard/panels/{name}/?window=30d" for name in PANELS),
        *(f"/dashboard/calls/{request_id}/" for request_id in failover),
    ]  # fmt: skip
    pages = {}
    for url in urls:
        response = client.get(url)
        assert response.status_code == 200, url
        pages[url] = response.content.decode()

    secrets = {**seeded.secrets, **seeded.tokens}
    for url, html in pages.items():
        for name, secret in secrets.items():
            # The whole secret, or the part a mask hides (all but a prefix and the last 4).
            assert secret not in html, f"{name}'s secret is in {url}"
            assert secret[-12:-4] not in html, f"{name}'s secret (middle) is in {url}"
    # The keys are there, masked: the test looks at the pages that show them.
    assert "sk-dash-…" in pages["/dashboard/keys/?window=30d"]
    assert "llmr_" in pages["/dashboard/clients/?window=30d"]
