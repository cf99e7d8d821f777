"""Light and dark: the page follows the system's colour scheme until the toggle pins one, the
pinned choice survives a reload, and the toggle leads back to following the system.

The toggle cycles from following the system to the other theme (so that the first click
always changes what is on screen), then to the system's theme pinned, then back to following.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.dashboard.conftest import Dashboard, log_in, screenshot

pytestmark = [pytest.mark.embedded, pytest.mark.e2e]

# --bg of static/dashboard/app.css, as the browser computes it.
LIGHT, DARK = "rgb(245, 246, 248)", "rgb(10, 13, 19)"
BACKGROUND = "getComputedStyle(document.body).backgroundColor"
STORED = "localStorage.getItem('llmrotate-theme')"
PINNED = "document.documentElement.dataset.theme ?? null"
TICKS = "Chart.getChart('chart-calls').options.scales.y.ticks.color"


def test_it_follows_the_system_until_toggled_and_remembers_the_choice(
    dashboard: Dashboard, new_page: Any
) -> None:
    light, _ = new_page(color_scheme="light")
    log_in(light, dashboard)
    assert light.evaluate(BACKGROUND) == LIGHT

    page, _ = new_page(color_scheme="dark")
    page.context.add_cookies(light.context.cookies())
    page.goto(dashboard.url("/dashboard/"))
    assert page.evaluate(BACKGROUND) == DARK
    assert page.evaluate(STORED) is None and page.evaluate(PINNED) is None
    assert "system (dark)" in str(page.get_attribute("#theme-toggle", "aria-label"))
    page.wait_for_function("() => window.Chart && Chart.getChart('chart-calls')")
    system_ticks = page.evaluate(TICKS)

    page.click("#theme-toggle")  # system (dark) -> light, pinned over the system's dark
    assert (page.evaluate(PINNED), page.evaluate(STORED)) == ("light", "light")
    assert page.evaluate(BACKGROUND) == LIGHT
    assert page.evaluate(TICKS) != system_ticks  # the charts follow the theme

    page.click("#theme-toggle")  # light -> dark, pinned
    assert (page.evaluate(PINNED), page.evaluate(STORED)) == ("dark", "dark")
    page.reload()
    page.wait_for_function("() => window.Chart && Chart.getChart('chart-calls')")
    assert page.evaluate(PINNED) == "dark"
    assert page.evaluate(BACKGROUND) == DARK
    page.wait_for_timeout(400)  # the charts' first animation
    screenshot(page, "overview-dark", docs="overview-dark.png")

    page.click("#theme-toggle")  # dark -> follow the system again
    assert (page.evaluate(PINNED), page.evaluate(STORED)) == (None, None)
    assert "system (dark)" in str(page.get_attribute("#theme-toggle", "aria-label"))
    # The system changes its mind: so does the open page, and the next one.
    page.emulate_media(color_scheme="light")
    assert page.evaluate(BACKGROUND) == LIGHT
    page.reload()
    assert page.evaluate(PINNED) is None
    assert page.evaluate(BACKGROUND) == LIGHT
