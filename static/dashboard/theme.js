// llmrotate dashboard: the theme picker. Every change of the page's colours is announced as a
// "llmrotate:theme" event on document, which the charts (app.js, experiments.js) recolour on.
//
// A theme is a stylesheet of custom properties under [data-theme="<name>"] (static/dashboard/
// themes/); the pick is that attribute on <html>, remembered in localStorage. "system" is no
// attribute at all: light.css and dark.css then follow prefers-color-scheme. The pre-paint
// script in templates/dashboard/_theme_head.html applies a remembered pick before this runs.
(() => {
  "use strict";

  const announce = () => document.dispatchEvent(new CustomEvent("llmrotate:theme"));
  const root = document.documentElement;
  const THEME_KEY = "llmrotate-theme";
  const SYSTEM = "system";
  const darkQuery = window.matchMedia("(prefers-color-scheme: dark)");

  const picker = document.getElementById("theme-picker");
  const button = document.getElementById("theme-toggle");
  const menu = document.getElementById("theme-menu");
  if (!picker || !button || !menu) return;
  const radios = [...menu.querySelectorAll("input[name=theme]")];

  const choice = () => root.dataset.theme || SYSTEM;
  const systemTheme = () => (darkQuery.matches ? "dark" : "light");
  // The names come from the picker's own labels, already in the page's language.
  const nameOf = (value) =>
    radios.find((r) => r.value === value)?.closest("label").querySelector(".theme-name")
      .textContent.trim() ?? value;
  const describe = (value) => value === SYSTEM
    ? interpolate(gettext("System (%(theme)s)"), { theme: nameOf(systemTheme()) }, true)
    : nameOf(value);

  function show() {
    const current = choice();
    for (const radio of radios) radio.checked = radio.value === current;
    const text = interpolate(gettext("Theme: %(theme)s"), { theme: describe(current) }, true);
    button.setAttribute("aria-label", text);
    button.title = text;
  }

  function pick(value) {
    const known = radios.some((r) => r.value === value);
    const theme = known && value !== SYSTEM ? value : null;
    try {
      if (theme) localStorage.setItem(THEME_KEY, theme);
      else localStorage.removeItem(THEME_KEY);
    } catch {
      // Storage refused (private mode): the pick lasts for this page only.
    }
    if (theme) root.dataset.theme = theme;
    else delete root.dataset.theme;
    show();
    announce();
  }

  // --- the menu: a disclosure holding a radio group -----------------------------------------
  // Arrow keys move through the radios and apply each theme at once (a live preview); Enter,
  // Escape or Tab away closes the menu. A click picks and closes.

  const isOpen = () => !menu.hidden;
  function open() {
    menu.hidden = false;
    button.setAttribute("aria-expanded", "true");
    (radios.find((r) => r.checked) ?? radios[0]).focus();
  }
  function close(refocus) {
    if (!isOpen()) return;
    menu.hidden = true;
    button.setAttribute("aria-expanded", "false");
    if (refocus) button.focus();
  }

  button.addEventListener("click", () => (isOpen() ? close(false) : open()));
  let pointing = false;
  menu.addEventListener("pointerdown", () => { pointing = true; });
  menu.addEventListener("change", (event) => {
    pick(event.target.value);
    if (pointing) close(true);
    pointing = false;
  });
  picker.addEventListener("keydown", (event) => {
    pointing = false;
    if (isOpen() && (event.key === "Escape" || (event.key === "Enter" && menu.contains(event.target)))) {
      event.preventDefault();
      close(true);
    }
  });
  picker.addEventListener("focusout", (event) => {
    if (event.relatedTarget && !picker.contains(event.relatedTarget)) close(false);
  });
  document.addEventListener("pointerdown", (event) => {
    if (!picker.contains(event.target)) close(false);
  });

  // Following the system, the page changes with it; a pinned theme does not, but the label
  // of "System" in the picker does.
  darkQuery.addEventListener("change", () => {
    show();
    if (choice() === SYSTEM) announce();
  });
  show();
})();
