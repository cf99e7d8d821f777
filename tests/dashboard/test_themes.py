"""Every theme of the dashboard keeps its text readable: WCAG AA contrast (4.5:1, or 3:1 for
large text) for every text colour on every background the page puts it on.

Two ways. The first computes it from the theme files themselves: each text colour on each
background of app.css, tinted backgrounds (color-mix) mixed as the browser mixes them, with
a guard that makes a new tinted background in app.css fail here until it is listed. The second
loads the seeded overview in a real browser once per theme and measures every visible piece of
text against what is really behind it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.dashboard.conftest import Dashboard, log_in

# The same files in both legs: once is enough. The browser test is e2e besides.
pytestmark = pytest.mark.embedded

STATIC = Path(__file__).resolve().parents[2] / "static" / "dashboard"
THEMES = ["light", "dark", "solarized-light", "terminal", "high-contrast"]
AA, AAA, UI = 4.5, 7.0, 3.0

RGB = tuple[float, float, float]
Palette = dict[str, str]


# --- the theme files -----------------------------------------------------------------------------


def css_blocks(css: str) -> list[tuple[str, str, Palette]]:
    """(enclosing at-rule or "", selector, declarations) for every innermost rule."""
    css = re.sub(r"/\*.*?\*/", "", css, flags=re.S)
    blocks = []
    for match in re.finditer(r"([^{};]+)\{([^{}]*)\}", css):
        before = css[: match.start()]
        at_rule = re.findall(r"(@media[^{]*)\{", before)
        inside = at_rule[-1].strip() if at_rule and before.count("{") > before.count("}") else ""
        declarations = dict(
            (name.strip(), value.strip())
            for name, _, value in (d.partition(":") for d in match.group(2).split(";"))
            if name.strip()
        )
        blocks.append((inside, " ".join(match.group(1).split()), declarations))
    return blocks


def palette(theme: str) -> Palette:
    """The custom properties (and color-scheme) the theme's file gives [data-theme=theme]."""
    found = [
        props
        for at_rule, selector, props in css_blocks((STATIC / "themes" / f"{theme}.css").read_text())
        if not at_rule and f'[data-theme="{theme}"]' in selector
    ]
    assert len(found) == 1, f"themes/{theme}.css: one rule for [data-theme={theme!r}] expected"
    return found[0]


def hex_rgb(value: str) -> RGB:
    digits = value.removeprefix("#")
    if len(digits) == 3:
        digits = "".join(c * 2 for c in digits)
    assert re.fullmatch(r"[0-9a-fA-F]{6}", digits), f"not a #rrggbb colour: {value}"
    return (int(digits[0:2], 16), int(digits[2:4], 16), int(digits[4:6], 16))


def mix(top: RGB, share: float, under: RGB) -> RGB:
    """color-mix(in srgb, top share, under); with `under` transparent, the same mix is what
    compositing the result over a background gives."""
    return (
        top[0] * share + under[0] * (1 - share),
        top[1] * share + under[1] * (1 - share),
        top[2] * share + under[2] * (1 - share),
    )


def luminance(rgb: RGB) -> float:
    def linear(channel: float) -> float:
        c = channel / 255
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (linear(c) for c in rgb)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast(a: RGB, b: RGB) -> float:
    high, low = sorted((luminance(a), luminance(b)), reverse=True)
    return (high + 0.05) / (low + 0.05)


# --- what app.css puts on what -------------------------------------------------------------------

TEXTS = [
    "--text",
    "--muted",
    "--accent-text",
    "--ok-text",
    "--warn-text",
    "--bad-text",
    "--info-text",
    "--grey-text",
]
PLAIN = ["--bg", "--surface", "--surface-2", "--surface-hover"]
TONES = {
    "ok": ("--ok", "--ok-text"),
    "warn": ("--warn", "--warn-text"),
    "bad": ("--bad", "--bad-text"),
    "info": ("--info", "--info-text"),
    "muted": ("--grey", "--grey-text"),
}

# Every color-mix() of app.css, and why this file covers it: a background that text sits on
# (checked in pairs() below) or a fill or edge no text sits on. A new one fails
# test_every_tinted_background_of_app_css_is_accounted_for until it is listed here.
COLOR_MIXES = {
    "color-mix(in srgb, var(--surface) 85%, transparent)": "top bar, over --bg",
    "color-mix(in srgb, var(--tone) 35%, transparent)": "border of .notice",
    "color-mix(in srgb, var(--tone) 10%, var(--surface))": ".notice",
    "color-mix(in srgb, var(--tone) 13%, transparent)": ".badge, over the card",
    "color-mix(in srgb, var(--tone) 22%, transparent)": "edge of .badge",
    "color-mix(in srgb, var(--surface-2) 50%, transparent)": ".chart-empty, over the card",
    "color-mix(in srgb, var(--accent) 16%, transparent)": "fill of the empty chart's drawing",
    "color-mix(in srgb, var(--accent) 12%, transparent)": ".empty-icon (an icon, no text)",
    "color-mix(in srgb, var(--warn) 16%, var(--surface))": ".capture-warning",
    "color-mix(in srgb, var(--tone) 14%, var(--surface))": ".attempt-marker",
}


def pairs(p: Palette) -> list[tuple[str, str, RGB, RGB, float]]:
    """(text, background, text colour, background colour, minimum) for everything app.css
    writes on something."""
    c = {name: hex_rgb(value) for name, value in p.items() if value.startswith("#")}
    grounds = {name: c[name] for name in PLAIN}
    grounds["top bar"] = mix(c["--surface"], 0.85, c["--bg"])
    grounds["empty chart"] = mix(c["--surface-2"], 0.5, c["--surface"])
    out = [(t, where, c[t], ground, AA) for t in TEXTS for where, ground in grounds.items()]
    for tone, (fill, text) in TONES.items():
        for where in PLAIN:
            badge = mix(c[fill], 0.13, c[where])
            out.append((text, f"{tone} badge on {where}", c[text], badge, AA))
        notice = mix(c[fill], 0.10, c["--surface"])
        for on_notice in ("--text", "--accent-text", text):
            out.append((on_notice, f"{tone} notice", c[on_notice], notice, AA))
        marker = mix(c[fill], 0.14, c["--surface"])
        out.append((text, f"{tone} attempt marker", c[text], marker, AA))
    capture = mix(c["--warn"], 0.16, c["--surface"])
    for text in ("--text", "--muted", "--accent-text", "--warn-text"):
        out.append((text, "capture warning", c[text], capture, AA))
    out.append(("--on-accent", "--accent (primary button)", c["--on-accent"], c["--accent"], AA))
    out.append(("--code-text", "--code-bg", c["--code-text"], c["--code-bg"], AA))
    # Not text, but what shows where the keyboard is: the focus ring, the current tab's line.
    for where in ("--bg", "--surface", "--surface-2"):
        out.append(("--accent (focus ring)", where, c["--accent"], c[where], UI))
    return out


# --- the computation -----------------------------------------------------------------------------


def test_every_theme_file_defines_the_same_properties_and_every_one_app_css_uses() -> None:
    app_css = (STATIC / "app.css").read_text()
    defaults = {
        name
        for at_rule, selector, props in css_blocks(app_css)
        if selector == ":where(:root)"
        for name in props
    }
    used = set(re.findall(r"var\((--[\w-]+)", app_css)) - {"--tone", "--tone-text"}
    names = {theme: set(palette(theme)) for theme in THEMES}
    for theme, defined in names.items():
        assert defined - {"color-scheme"} >= used - defaults, (
            f"{theme}: app.css uses {sorted(used - defaults - defined)}, which it does not define"
        )
        # Beyond the colours, a theme may change app.css's defaults (font, corners).
        assert defined - defaults == names["light"] - defaults, (
            f"{theme} and light differ in {sorted((defined ^ names['light']) - defaults)}"
        )
        assert palette(theme)["color-scheme"] in ("light", "dark")
    assert not re.search(r"#[0-9a-fA-F]{3,8}\b|rgb\(|light-dark\(", app_css), (
        "app.css holds a colour of its own: it belongs in the theme files"
    )


def test_system_is_light_or_dark_as_the_system_says() -> None:
    light = css_blocks((STATIC / "themes" / "light.css").read_text())
    assert any(
        ":root:not([data-theme])" in selector and '[data-theme="light"]' in selector
        for _, selector, _ in light
    ), "light.css: light is also what a page without data-theme shows"
    dark = css_blocks((STATIC / "themes" / "dark.css").read_text())
    system_dark = [
        props
        for at_rule, selector, props in dark
        if at_rule == "@media (prefers-color-scheme: dark)"
        and selector == ":root:not([data-theme])"
    ]
    assert system_dark == [palette("dark")], (
        "dark.css: the system's dark must be the dark theme, property for property"
    )


@pytest.mark.parametrize("theme", THEMES)
def test_every_text_colour_reaches_wcag_aa_on_every_background(theme: str) -> None:
    p = palette(theme)
    failures = []
    for text, where, fg, bg, minimum in pairs(p):
        # The high-contrast theme promises AAA for its text.
        need = AAA if theme == "high-contrast" and minimum == AA else minimum
        ratio = contrast(fg, bg)
        if ratio < need:
            failures.append(f"{theme}: {text} on {where}: {ratio:.2f}:1 < {need}:1")
    assert not failures, "\n".join(failures)


def test_the_high_contrast_theme_shows_every_edge() -> None:
    c = {name: hex_rgb(v) for name, v in palette("high-contrast").items() if v.startswith("#")}
    for edge in ("--border", "--border-strong"):
        for where in PLAIN:
            assert contrast(c[edge], c[where]) >= UI, f"high-contrast: {edge} on {where}"


def test_every_tinted_background_of_app_css_is_accounted_for() -> None:
    app_css = " ".join((STATIC / "app.css").read_text().split())
    found = set(re.findall(r"color-mix\([^()]*(?:\([^()]*\)[^()]*)*\)", app_css))
    assert found <= set(COLOR_MIXES), (
        f"new tinted colours in app.css: {sorted(found - set(COLOR_MIXES))}; add each to "
        "COLOR_MIXES, and to pairs() if text sits on it"
    )


def test_the_contrast_formula() -> None:
    # WCAG's own reference points: black on white is 21:1, #767676 on white is 4.54:1.
    assert round(contrast((0, 0, 0), (255, 255, 255)), 2) == 21
    assert round(contrast(hex_rgb("#767676"), (255, 255, 255)), 2) == 4.54


# --- in the browser ------------------------------------------------------------------------------

# Every visible element with text of its own: its colour against the background really behind
# it, found by compositing the backgrounds of it and its ancestors from the root down.
MEASURE = """() => {
  const canvas = document.createElement("canvas");
  canvas.width = canvas.height = 1;
  const ctx = canvas.getContext("2d", {willReadFrequently: true});
  function rgba(css) {
    let m = css.match(/^rgba?\\(([\\d.]+),\\s*([\\d.]+),\\s*([\\d.]+)(?:,\\s*([\\d.]+))?\\)$/);
    if (m) return [+m[1], +m[2], +m[3], m[4] === undefined ? 1 : +m[4]];
    m = css.match(/^color\\(srgb ([\\d.e-]+) ([\\d.e-]+) ([\\d.e-]+)(?: \\/ ([\\d.]+))?\\)$/);
    if (m) return [m[1] * 255, m[2] * 255, m[3] * 255, m[4] === undefined ? 1 : +m[4]];
    ctx.clearRect(0, 0, 1, 1);
    ctx.fillStyle = css;
    ctx.fillRect(0, 0, 1, 1);
    const d = ctx.getImageData(0, 0, 1, 1).data;
    return [d[0], d[1], d[2], d[3] / 255];
  }
  const over = (top, under) => [0, 1, 2].map((i) => top[i] * top[3] + under[i] * (1 - top[3]));
  const lum = (rgb) => {
    const [r, g, b] = rgb.map((v) => {
      const c = v / 255;
      return c <= 0.04045 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4;
    });
    return 0.2126 * r + 0.7152 * g + 0.0722 * b;
  };
  const ratio = (a, b) => {
    const [hi, lo] = [lum(a), lum(b)].sort((x, y) => y - x);
    return (hi + 0.05) / (lo + 0.05);
  };
  const hex = (rgb) => "#" + rgb.map((v) => Math.round(v).toString(16).padStart(2, "0")).join("");
  function ground(el) {
    const chain = [];
    for (let e = el; e; e = e.parentElement) chain.unshift(e);
    let color = [255, 255, 255];
    for (const e of chain) color = over(rgba(getComputedStyle(e).backgroundColor), color);
    return color;
  }
  const one = (el) => el.tagName.toLowerCase() + (el.id ? "#" + el.id : "") +
    [...el.classList].map((c) => "." + c).join("");
  const name = (el) => {
    const landmark = el.parentElement?.closest("[id]");
    return (landmark ? one(landmark) + " " : "") + one(el);
  };
  const ownText = (el) => [...el.childNodes]
    .filter((n) => n.nodeType === Node.TEXT_NODE).map((n) => n.textContent).join("").trim();
  const fields = "select, input:not([type=radio], [type=checkbox], [type=hidden])";
  const problems = [];
  let checked = 0;
  for (const el of document.body.querySelectorAll("*")) {
    if (el.closest("script, style, noscript, template, option, svg")) continue;
    const words = el.matches(fields) ? (el.value || el.placeholder || "") : ownText(el);
    if (!words) continue;
    if (!el.checkVisibility({visibilityProperty: true, opacityProperty: true})) continue;
    const box = el.getBoundingClientRect();
    if (box.width <= 1 || box.height <= 1) continue;  // .sr-only
    const style = getComputedStyle(el);
    const bg = ground(el);
    const fg = over(rgba(style.color), bg);
    const size = parseFloat(style.fontSize);
    const large = size >= 24 || (size >= 18.66 && +style.fontWeight >= 700);
    const need = large ? 3 : 4.5;
    const got = ratio(fg, bg);
    checked += 1;
    if (got < need) {
      problems.push(`${name(el)} "${words.slice(0, 30)}": ${hex(fg)} on ${hex(bg)} ` +
        `${got.toFixed(2)}:1 < ${need}:1`);
    }
  }
  return {checked, problems};
}"""


@pytest.mark.e2e
def test_every_visible_text_of_the_overview_is_readable_in_every_theme(
    dashboard: Dashboard, new_page: Callable[..., tuple[Any, Any]]
) -> None:
    page, _ = new_page()
    log_in(page, dashboard)
    failures = []
    for theme in THEMES:
        page.evaluate("t => localStorage.setItem('llmrotate-theme', t)", theme)
        page.goto(dashboard.url("/dashboard/"))
        page.wait_for_function("() => window.Chart && Chart.getChart('chart-calls')")
        assert page.evaluate("document.documentElement.dataset.theme") == theme
        page.click("#theme-toggle")  # the open menu's own text is measured too
        result = page.evaluate(MEASURE)
        assert result["checked"] > 100, f"{theme}: only {result['checked']} texts measured"
        failures += [f"{theme}: {problem}" for problem in result["problems"]]
    assert not failures, "\n".join(failures)
