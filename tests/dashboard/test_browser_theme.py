"""The theme picker: "system" (the default) follows the system's colour scheme, light or dark;
each of the five themes is picked from the menu, recolours the page and its charts at once, and
survives a reload; picking "System" again forgets the pick. The menu works from the keyboard.

What the themes' colours are worth (contrast) is tests/dashboard/test_themes.py's business.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.dashboard.conftest import Dashboard, log_in, screenshot
from tests.dashboard.test_themes import THEMES, hex_rgb, palette

pytestmark = [pytest.mark.embedded, pytest.mark.e2e]

BACKGROUND = "getComputedStyle(document.body).backgroundColor"
STORED = "localStorage.getItem('llmrotate-theme')"
PINNED = "document.documentElement.dataset.theme ?? null"
CHECKED = "document.querySelector('#theme-menu input:checked')?.value ?? null"
MENU_OPEN = "!document.getElementById('theme-menu').hidden"
TICKS = "Chart.getChart('chart-calls').options.scales.y.ticks.color"
CHARTS = "() => window.Chart && Chart.getChart('chart-calls')"
SCREENSHOTS = {"dark": "overview-dark", "terminal": "overview-terminal"}


def computed(theme: str, prop: str) -> str:
    """The theme's colour, as the browser reports a computed colour."""
    red, green, blue = hex_rgb(palette(theme)[prop])
    return f"rgb({red}, {green}, {blue})"


def background(theme: str) -> str:
    return computed(theme, "--bg")


def ticks(theme: str) -> str:
    """The charts' axis labels are in --muted."""
    return computed(theme, "--muted")


def pick(page: Any, theme: str) -> None:
    page.click("#theme-toggle")
    page.locator("#theme-menu .theme-option", has=page.locator(f"input[value='{theme}']")).click()


def test_each_theme_is_picked_shown_remembered_and_recolours_the_charts(
    dashboard: Dashboard, new_page: Any
) -> None:
    page, _ = new_page(color_scheme="light")
    log_in(page, dashboard)
    page.wait_for_function(CHARTS)
    assert (page.evaluate(PINNED), page.evaluate(STORED)) == (None, None)
    assert page.evaluate(CHECKED) == "system"
    assert page.evaluate(BACKGROUND) == background("light")
    assert "System (Light)" in str(page.get_attribute("#theme-toggle", "aria-label"))
    assert page.evaluate(TICKS) == ticks("light")

    for theme in THEMES:
        pick(page, theme)
        assert not page.evaluate(MENU_OPEN)  # a click picks and closes
        assert (page.evaluate(PINNED), page.evaluate(STORED)) == (theme, theme)
        assert page.evaluate(BACKGROUND) == background(theme)
        assert page.evaluate(TICKS) == ticks(theme), f"{theme}: the charts kept other colours"

        page.reload()
        page.wait_for_function(CHARTS)
        assert (page.evaluate(PINNED), page.evaluate(CHECKED)) == (theme, theme)
        assert page.evaluate(BACKGROUND) == background(theme)
        if theme in SCREENSHOTS:
            page.wait_for_timeout(400)  # the charts' first animation
            screenshot(page, SCREENSHOTS[theme], docs=f"{SCREENSHOTS[theme]}.png")

    pick(page, "system")
    assert (page.evaluate(PINNED), page.evaluate(STORED)) == (None, None)
    assert page.evaluate(BACKGROUND) == background("light")
    assert page.evaluate(TICKS) == ticks("light")
    # The system changes its mind: so do the open page, its charts, and the next page.
    page.emulate_media(color_scheme="dark")
    assert page.evaluate(BACKGROUND) == background("dark")
    # The media query's change event comes after emulate_media returns: wait for the charts.
    page.wait_for_function(f"() => {TICKS} === '{ticks('dark')}'", timeout=5000)
    page.wait_for_function(
        "() => document.getElementById('theme-toggle').ariaLabel.includes('System (Dark)')",
        timeout=5000,
    )
    page.reload()
    assert page.evaluate(PINNED) is None
    assert page.evaluate(BACKGROUND) == background("dark")


def test_the_picker_works_from_the_keyboard(configured_dashboard: Dashboard, new_page: Any) -> None:
    page, _ = new_page(color_scheme="dark")
    log_in(page, configured_dashboard)
    assert page.evaluate(BACKGROUND) == background("dark")  # the system's dark

    page.focus("#theme-toggle")
    page.keyboard.press("Enter")
    assert page.evaluate(MENU_OPEN)
    assert page.get_attribute("#theme-toggle", "aria-expanded") == "true"
    assert page.evaluate("document.activeElement.value") == "system"  # on the current pick
    # Arrows move through the themes and show each at once; the menu stays open.
    page.keyboard.press("ArrowDown")
    assert page.evaluate(PINNED) == "light"
    page.keyboard.press("ArrowDown")
    page.keyboard.press("ArrowDown")
    assert page.evaluate(PINNED) == "solarized-light"
    assert page.evaluate(BACKGROUND) == background("solarized-light")
    assert page.evaluate(MENU_OPEN)
    page.keyboard.press("Escape")
    assert not page.evaluate(MENU_OPEN)
    assert page.get_attribute("#theme-toggle", "aria-expanded") == "false"
    assert page.evaluate("document.activeElement.id") == "theme-toggle"
    assert page.evaluate(STORED) == "solarized-light"
    assert "Solarized light" in str(page.get_attribute("#theme-toggle", "aria-label"))

    # Enter closes too; a click anywhere else closes it without a change.
    page.keyboard.press("Enter")
    page.keyboard.press("ArrowUp")
    page.keyboard.press("Enter")
    assert not page.evaluate(MENU_OPEN)
    assert page.evaluate(PINNED) == "dark"
    page.click("#theme-toggle")
    page.click("h1")
    assert not page.evaluate(MENU_OPEN)
    assert page.evaluate(PINNED) == "dark"
