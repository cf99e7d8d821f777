"""No page of the dashboard, and no panel or request it polls, shows an upstream key or a
client token: only their masked forms. Rendered for the seeded gateway (tests/dashboard/seed.py),
whose every secret is known here, in both legs: once with its traffic, and once before any
call, when every page shows its empty state (the first-request snippet, "no calls yet").

"Not shown" is strict: no run of 8 characters of a secret may appear, except the parts its
mask is meant to show (a key's vendor prefix, `sk-dash-`, and last 4; a token's `llmr_` and
lookup prefix). A mask that let one more character through, at either end, fails.
"""

from __future__ import annotations

import pytest
from django.contrib.auth.models import User
from django.test import Client

from llmrotate_site.dashboard.panels import PANELS
from tests.dashboard.seed import SeededGateway, dashboard_seed
from usage.models import CallRecord

pytestmark = pytest.mark.django_db(transaction=True)

RUN = 8
PAGES = ("", "keys/", "health/", "calls/", "clients/")
KEY_PREFIX = "sk-dash-"  # seed.key_secret's vendor prefix, which mask_secret keeps
TAIL = 4  # and the last characters it keeps
TOKEN_SHOWN = len("llmr_") + 8 + 1  # llmr_<lookup prefix>_ (keys.crypto): identifies, not secret


def _render(client: Client, urls: list[str]) -> dict[str, str]:
    pages = {}
    for url in urls:
        response = client.get(url)
        assert response.status_code == 200, url
        pages[url] = response.content.decode()
    return pages


def _secret_runs(seeded: SeededGateway) -> dict[str, set[str]]:
    """Every run of RUN characters of every secret, less those inside its allowed prefix."""
    shown = {**dict.fromkeys(seeded.secrets.values(), len(KEY_PREFIX)),
             **dict.fromkeys(seeded.tokens.values(), TOKEN_SHOWN)}  # fmt: skip
    names = {
        **{v: k for k, v in seeded.secrets.items()},
        **{v: k for k, v in seeded.tokens.items()},
    }
    runs = {}
    for secret, allowed in shown.items():
        assert len(secret) > allowed + RUN  # the test means something for this secret
        runs[names[secret]] = {
            secret[i : i + RUN] for i in range(len(secret) - RUN + 1) if i + RUN > allowed
        }
    return runs


def _assert_nothing_leaks(pages: dict[str, str], seeded: SeededGateway) -> None:
    for name, runs in _secret_runs(seeded).items():
        for url, html in pages.items():
            leaked = sorted(run for run in runs if run in html)
            assert not leaked, f"{name}'s secret shows in {url}: {leaked[:3]}"
    # The tail is shorter than a run: a mask showing one character more there is looked for
    # as the mask would show it.
    for name, secret in seeded.secrets.items():
        for url, html in pages.items():
            assert f"…{secret[-(TAIL + 1) :]}" not in html, f"{name}'s tail shows in {url}"


def test_no_page_shows_a_seeded_key_or_token_unmasked(client: Client) -> None:
    seeded = dashboard_seed(upstream_url="http://127.0.0.1:9/v1", records=800)
    client.force_login(User.objects.create_superuser("ops", "ops@example.com", "pw"))
    requests = CallRecord.objects.order_by("-attempt", "-started_at")
    failover = list(requests.values_list("request_id", flat=True)[:3])
    pages = _render(
        client,
        [
            *(f"/dashboard/{page}?window=30d" for page in PAGES),
            *(f"/dashboard/panels/{name}/?window=30d" for name in PANELS),
            *(f"/dashboard/calls/{request_id}/" for request_id in failover),
        ],
    )
    _assert_nothing_leaks(pages, seeded)
    # The keys are there, masked: the test looks at the pages that show them.
    assert "sk-dash-…" in pages["/dashboard/keys/?window=30d"]
    assert "llmr_" in pages["/dashboard/clients/?window=30d"]


def test_no_empty_state_shows_a_seeded_key_or_token_unmasked(client: Client) -> None:
    seeded = dashboard_seed(upstream_url="http://127.0.0.1:9/v1", records=0)
    client.force_login(User.objects.create_superuser("ops", "ops@example.com", "pw"))
    pages = _render(
        client,
        [
            *(f"/dashboard/{page}" for page in PAGES),
            *(f"/dashboard/panels/{name}/" for name in PANELS),
        ],
    )
    _assert_nothing_leaks(pages, seeded)
    # These are the empty states, teaching the first request, with the clients listed.
    assert "Send your first request" in pages["/dashboard/"]
    assert "Send your first request" in pages["/dashboard/calls/"]
    assert "llmr_" in pages["/dashboard/clients/"]


# What a caller may put in the headers the gateway keeps (#9): a provider key, and a credential
# that is not shaped like one, in a query string of the user agent, in the Origin's userinfo
# and query, in the app title and in the session id.
CALLER_KEY = "sk-proj-" + "0123456789abcdef" * 2
CALLER_QUERY_SECRET = "qv" + "Zx9Yw8Vu7Ts6Rq5Po4Nm3Lk2Ji1Hg0"
CALLER_PASSWORD = "pw-Zx9Yw8Vu7Ts6Rq5P"
CALLER_HEADERS = {
    "user-agent": f"evil-agent/1.0 (+https://cb.example/hook?access_token={CALLER_QUERY_SECRET}"
    f"&key={CALLER_KEY})",
    "origin": f"https://ops:{CALLER_PASSWORD}@app.example:8443/path?api_key={CALLER_QUERY_SECRET}",
    "x-title": f"My App Bearer {CALLER_KEY}",
    "x-session-id": f"sess-{CALLER_KEY}",
}


def test_no_page_shows_a_credential_a_caller_sent_in_its_headers(client: Client) -> None:
    from datetime import timedelta

    from django.utils import timezone

    from proxy.callers import caller_from
    from tests.usage.monitoring import call, write_calls

    caller = caller_from(CALLER_HEADERS, {"messages": [{"role": "user", "content": "hi"}]})
    now = timezone.now()
    write_calls(
        [
            call(request_id="r-caller", started_at=now, finished_at=now + timedelta(seconds=1),
                 final=True, client_status=200, user_agent=caller.user_agent,
                 origin=caller.origin, app_title=caller.app_title, session_id=caller.session_id,
                 turn=caller.turn, counted_prompt_tokens=9, forwarded_prompt_tokens=9)
        ]
    )  # fmt: skip
    client.force_login(User.objects.create_superuser("ops", "ops@example.com", "pw"))
    pages = _render(
        client,
        [
            "/dashboard/calls/?window=1h",
            "/dashboard/calls/r-caller/",
            "/dashboard/clients/?window=1h",
            "/dashboard/?window=1h",
        ],
    )
    allowed = {CALLER_KEY: len("sk-proj-"), CALLER_QUERY_SECRET: 0, CALLER_PASSWORD: 0}
    for secret, shown in allowed.items():
        runs = {secret[i : i + RUN] for i in range(len(secret) - RUN + 1) if i + RUN > shown}
        for url, html in pages.items():
            leaked = sorted(run for run in runs if run in html)
            assert not leaked, f"a caller's credential shows in {url}: {leaked[:3]}"
    # The fields are there, cleaned: the test looks at pages that show them.
    request_page = pages["/dashboard/calls/r-caller/"]
    assert ">https://app.example:8443<" in request_page  # no userinfo, path or query
    assert "evil-agent/1.0" in request_page and "sess-sk-proj-…" in request_page
    assert "My App Bearer sk-proj-…" in pages["/dashboard/calls/?window=1h"]
