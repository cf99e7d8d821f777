"""Dashboard fixtures: a seeded (or empty) gateway served by the real ASGI app in a uvicorn
thread, and a real headless Chromium driven by Playwright.

The browser is Debian's `chromium` (`make browser` installs it); Playwright's own browser
download is never used. Each test gets a new browser context (no cookies, no localStorage) and
a `BrowserWatch` that fails the test on any console error, page error, failed request or HTTP
error status.
"""

from __future__ import annotations

import gc
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port
from tests.dashboard.seed import SeededGateway, dashboard_seed
from tests.e2e import conftest as e2e
from tests.e2e.conftest import GatewayThread

# The end-to-end tests' fake upstream (a real server on 127.0.0.1), shared with them.
_fake_upstream_server = e2e._fake_upstream_server
fake_upstream = e2e.fake_upstream

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = Path(__file__).resolve().parents[1] / "artifacts" / "screenshots"
STAFF_USER, STAFF_PASSWORD = "ops", "correct-horse-battery-staple"
# Polls every 5 s; a test waiting for one allows two.
POLL_TIMEOUT_MS = 12_000


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "embedded: runs only in the embedded leg")


@dataclass
class Dashboard:
    base_url: str  # http://127.0.0.1:<port>
    seeded: SeededGateway | None

    def url(self, path: str) -> str:
        return f"{self.base_url}{path}"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run `make browser` (Debian's chromium package)")
    # Playwright's sync API keeps its event loop registered as this thread's running loop, and
    # Django then refuses every ORM call of the test ("async context"). Nothing here is really
    # async, so lift the check while the browser exists (this module only), as Playwright's
    # Django guidance says.
    with (
        pytest.MonkeyPatch.context() as patch,
        sync_playwright() as playwright,
    ):
        patch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
        # launch() gives the browser a fresh temporary user-data-dir of its own.
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        yield chromium
        chromium.close()


@dataclass
class BrowserWatch:
    """Everything that went wrong in the page, as the browser saw it."""

    problems: list[str] = field(default_factory=list)

    def attach(self, page: Any) -> None:
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.problems.append(f"page error: {exc}"))
        page.on("requestfailed", self._failed)
        page.on("response", self._response)

    def _console(self, message: Any) -> None:
        if message.type == "error":
            self.problems.append(f"console error: {message.text} ({message.location})")

    def _failed(self, request: Any) -> None:
        # A poll (or the favicon, which the page's load event does not wait for) still in
        # flight when the test navigates away is cancelled by the browser; that is not a
        # failure of the page.
        if request.failure == "net::ERR_ABORTED" and (
            "/dashboard/panels/" in request.url or request.url.endswith("/favicon.svg")
        ):
            return
        self.problems.append(f"request failed: {request.method} {request.url} {request.failure}")

    def _response(self, response: Any) -> None:
        if response.status >= 400:
            self.problems.append(f"HTTP {response.status}: {response.url}")

    def assert_clean(self) -> None:
        assert not self.problems, "\n".join(self.problems)


def _start(records: int | None, upstream_url: str) -> tuple[GatewayThread, Dashboard]:
    """`records`: None for an empty database, else the seeded gateway with that much traffic."""
    from django.contrib.auth.models import User

    seeded = None if records is None else dashboard_seed(upstream_url=upstream_url, records=records)
    User.objects.create_superuser(STAFF_USER, "ops@example.com", STAFF_PASSWORD)
    server = GatewayThread(free_port())
    server.start()
    return server, Dashboard(base_url=f"http://127.0.0.1:{server.port}", seeded=seeded)


def _stop(server: GatewayThread) -> None:
    from usage.recorder import get_recorder

    server.stop()
    gc.collect()  # connections of the server's request threads (see tests/e2e/conftest.py)
    assert get_recorder().stop(timeout=10), "call records were not written in time"


@pytest.fixture
def dashboard(transactional_db: None, fake_upstream: Any) -> Iterator[Dashboard]:
    """The gateway with a realistic seeded history (see seed.py), served on 127.0.0.1."""
    server, dash = _start(1500, fake_upstream.base_url)
    yield dash
    _stop(server)


@pytest.fixture
def configured_dashboard(transactional_db: None, fake_upstream: Any) -> Iterator[Dashboard]:
    """The seeded gateway's providers, keys, routes and clients, but no traffic yet: for a
    test that writes calls of its own."""
    server, dash = _start(0, fake_upstream.base_url)
    yield dash
    _stop(server)


@pytest.fixture
def empty_dashboard(transactional_db: None, fake_upstream: Any) -> Iterator[Dashboard]:
    """The gateway on a fresh database: no keys, no clients, no traffic."""
    server, dash = _start(None, fake_upstream.base_url)
    yield dash
    _stop(server)


@pytest.fixture
def poll_every(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], None]:
    """`poll_every(1)`: pages rendered from now on poll their panels every second, so that a
    test of polling waits for seconds, not for the production interval."""
    from llmrotate_site.dashboard import views

    def set_interval(seconds: int) -> None:
        monkeypatch.setattr(views, "POLL_SECONDS", seconds)

    return set_interval


def set_visibility(page: Any, state: str) -> None:
    """Make the page believe its tab is `hidden` or `visible`, as a browser tells it: the
    properties, then the event. (Headless Chromium has no tab to hide.)"""
    page.evaluate(
        """state => {
            const set = (name, value) =>
                Object.defineProperty(document, name, {value, configurable: true});
            set("visibilityState", state);
            set("hidden", state === "hidden");
            document.dispatchEvent(new Event("visibilitychange"));
        }""",
        state,
    )


@pytest.fixture
def new_page(browser: Any) -> Iterator[Callable[..., tuple[Any, BrowserWatch]]]:
    """`new_page(color_scheme="dark", width=390, locale="ja", timezone_id="Asia/Tokyo")`: a
    page in a fresh context, watched. Every watch must be clean when the test ends."""
    contexts: list[Any] = []
    watches: list[BrowserWatch] = []

    def make(
        *,
        color_scheme: str = "light",
        width: int = 1440,
        locale: str = "en-US",
        timezone_id: str = "UTC",
    ) -> tuple[Any, BrowserWatch]:
        # A browser in English and in UTC unless a test asks otherwise: the pages follow both.
        context = browser.new_context(
            viewport={"width": width, "height": 900},
            color_scheme=color_scheme,
            locale=locale,
            timezone_id=timezone_id,
        )
        contexts.append(context)
        page = context.new_page()
        watch = BrowserWatch()
        watch.attach(page)
        watches.append(watch)
        return page, watch

    yield make
    for context in contexts:
        context.close()
    for watch in watches:
        watch.assert_clean()


def log_in(page: Any, dash: Dashboard, *, next_path: str = "/dashboard/") -> None:
    """Through the admin's login form, as a person would."""
    page.goto(dash.url(f"/admin/login/?next={next_path}"))
    page.fill("#id_username", STAFF_USER)
    page.fill("#id_password", STAFF_PASSWORD)
    page.click("input[type=submit]")
    page.wait_for_url(f"**{next_path}")
    page.wait_for_load_state("load")


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's header (bytes 16-24 of the IHDR chunk)."""
    header = path.read_bytes()[:24]
    return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")


def screenshot(page: Any, name: str, *, docs: str | None = None) -> Path:
    """Save to tests/artifacts/screenshots/ (always: every run leaves current screenshots of
    every page there). With `docs`, the README's copy in docs/screenshots/<docs> is refreshed
    when LLMROTATE_UPDATE_SCREENSHOTS=1 (or when it is missing); otherwise it is left alone,
    but it must still have the page's shape.

    The shape check is what keeps the README from drifting unnoticed: the seeded gateway is the
    same on every run, so the full page's height changes only when the layout does (a panel
    added, moved or resized). A change of colour or wording alone is not caught; comparing
    pixels would be, but the data's times and countdowns differ on every run.
    """
    import os

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    if docs:
        target = Path(__file__).resolve().parents[2] / "docs" / "screenshots" / docs
        if os.environ.get("LLMROTATE_UPDATE_SCREENSHOTS") == "1" or not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
        (width, height), (docs_width, docs_height) = png_size(path), png_size(target)
        assert width == docs_width and abs(height - docs_height) <= height * 0.01, (
            f"docs/screenshots/{docs} ({docs_width}x{docs_height}) no longer shows the page as "
            f"it renders ({width}x{height}, see {path}); refresh it with "
            "`LLMROTATE_UPDATE_SCREENSHOTS=1 make test-embedded PYTEST_ARGS=tests/dashboard`"
        )
    return path


@pytest.fixture
def capture_dir(settings: Any, tmp_path: Path) -> Iterator[Path]:
    """A capture folder of the test's own, and the dashboard's capture banner looking at it."""
    from usage.capture.selectors import capture_status_forget

    directory = tmp_path / "captures"
    settings.LLMROTATE_CAPTURE_DIR = directory
    capture_status_forget()
    yield directory
    capture_status_forget()


@pytest.fixture
def staff(client: Any) -> Any:
    """Django's test client, logged in as a superuser."""
    from django.contrib.auth.models import User

    client.force_login(User.objects.create_superuser("ops", "ops@example.com", "pw"))
    return client


def text(html: str) -> str:
    """The words a reader sees: tags out, whitespace folded."""
    return " ".join(re.sub(r"<[^>]+>", " ", html).split())
