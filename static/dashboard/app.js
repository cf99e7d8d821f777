// llmrotate dashboard: theme toggle, live countdowns, the request drawer, and the charts.
// The panels themselves refresh by HTMX polling (templates/dashboard/_panel.html); this file
// only adds what HTML cannot: re-polling at once when the tab becomes visible again, ticking
// timers between polls, and feeding each new copy of the chart data to Chart.js in place.
(() => {
  "use strict";

  const root = document.documentElement;
  const THEME_KEY = "llmrotate-theme";
  const darkQuery = window.matchMedia("(prefers-color-scheme: dark)");

  // Timers tick against the server's clock: a laptop a minute off would otherwise show a
  // cooldown ending a minute early or late.
  const serverNow = Date.parse(document.body.dataset.serverNow || "");
  const clockOffset = Number.isNaN(serverNow) ? 0 : serverNow - Date.now();
  const now = () => Date.now() + clockOffset;

  // --- theme ------------------------------------------------------------------------------

  // The choice is "light", "dark" or none (follow the system). A click goes from following
  // the system to the other theme first, so that it always changes what is on screen; then to
  // the system's theme, pinned; then back to following the system.
  const toggle = document.getElementById("theme-toggle");
  const systemTheme = () => (darkQuery.matches ? "dark" : "light");
  const choice = () => root.dataset.theme || null;
  const nextChoice = (current) => {
    if (!current) return systemTheme() === "dark" ? "light" : "dark";
    return current === systemTheme() ? null : systemTheme();
  };
  const describe = (c) => (c ? `${c}` : `system (${systemTheme()})`);

  function labelToggle() {
    if (!toggle) return;
    const text = `Theme: ${describe(choice())}. Switch to ${describe(nextChoice(choice()))}`;
    toggle.setAttribute("aria-label", text);
    toggle.title = text;
  }

  toggle?.addEventListener("click", () => {
    const next = nextChoice(choice());
    try {
      if (next) localStorage.setItem(THEME_KEY, next);
      else localStorage.removeItem(THEME_KEY);
    } catch {
      // Storage refused (private mode): the choice lasts for this page only.
    }
    if (next) root.dataset.theme = next;
    else delete root.dataset.theme;
    labelToggle();
    recolorCharts();
  });
  darkQuery.addEventListener("change", () => {
    labelToggle();
    recolorCharts();
  });
  labelToggle();

  // --- countdowns and "ago" -----------------------------------------------------------------

  function span(ms) {
    const s = Math.max(0, Math.round(ms / 1000));
    if (s < 60) return `${s}s`;
    const m = Math.floor(s / 60);
    if (m < 60) return `${m}m ${String(s % 60).padStart(2, "0")}s`;
    const h = Math.floor(m / 60);
    if (h < 48) return `${h}h ${String(m % 60).padStart(2, "0")}m`;
    return `${Math.floor(h / 24)}d ${h % 24}h`;
  }

  function tick() {
    const t = now();
    for (const el of document.querySelectorAll("time[data-until]")) {
      const left = Date.parse(el.dateTime) - t;
      el.textContent = left > 0 ? span(left) : "now";
    }
    for (const el of document.querySelectorAll("time[data-ago]")) {
      const ago = t - Date.parse(el.dateTime);
      el.textContent = ago < 5000 ? "just now" : `${span(ago)} ago`;
      el.title = el.dateTime;
    }
  }
  tick();
  setInterval(tick, 1000);

  // --- polling ----------------------------------------------------------------------------
  // Polls skip while the tab is hidden (the trigger's filter); coming back, refresh at once
  // rather than up to one interval later.
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState !== "visible" || !window.htmx) return;
    for (const el of document.querySelectorAll("[data-poll]")) window.htmx.trigger(el, "refresh");
  });

  const updatedAt = document.getElementById("updated-at");
  document.body.addEventListener("htmx:afterSettle", (event) => {
    tick();
    updateCharts();
    if (updatedAt && event.target.matches?.("[data-poll]")) {
      updatedAt.textContent = new Date(now()).toISOString().slice(11, 19);
    }
  });

  // --- request drawer -----------------------------------------------------------------------

  const drawer = document.getElementById("drawer");
  const drawerPanel = document.getElementById("request-detail");
  let opener = null;

  function closeDrawer() {
    if (!drawer || drawer.hidden) return;
    drawer.hidden = true;
    drawerPanel.replaceChildren();
    opener?.focus();
  }
  document.body.addEventListener("htmx:afterSwap", (event) => {
    if (event.target !== drawerPanel) return;
    opener = document.activeElement;
    drawer.hidden = false;
    drawerPanel.focus();
  });
  document.addEventListener("click", (event) => {
    if (event.target.closest("[data-close-drawer]")) {
      closeDrawer();
      return;
    }
    // An attempt's "capture" link on a page (or drawer) that has the capture section: open it
    // there (htmx loads it on opening) and go to the attempt's leg once it is in, rather than
    // leaving for the capture's own page.
    const captureLink = event.target.closest("a[data-capture-link]");
    const details = captureLink?.closest(".request")?.querySelector("details.capture");
    if (captureLink && details && !event.ctrlKey && !event.metaKey && !event.shiftKey) {
      event.preventDefault();
      const anchor = captureLink.hash.slice(1);
      const reveal = () => document.getElementById(anchor)?.scrollIntoView({ block: "start" });
      if (details.querySelector(".capture-legs")) {
        details.open = true;
        reveal();
      } else {
        details.addEventListener("htmx:afterSettle", reveal, { once: true });
        details.open = true;
      }
      return;
    }
    // A click anywhere on a call row opens it, as its link does.
    const row = event.target.closest("tr.record");
    if (row && !event.target.closest("a, button")) row.querySelector("a.req-link")?.click();
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape") closeDrawer();
  });

  // Filters apply as soon as one changes; typing in the model box waits for the change event.
  for (const form of document.querySelectorAll("form[data-autosubmit]")) {
    form.addEventListener("change", () => form.requestSubmit());
  }

  // --- charts ---------------------------------------------------------------------------------

  const charts = {};
  let shownData = null;
  const probe = document.createElement("span");
  probe.style.display = "none";
  document.body.append(probe);

  // CSS colours are light-dark() pairs; the computed colour of a probe resolves them.
  function cssColor(name, alpha = 1) {
    probe.style.color = `var(${name})`;
    const rgb = getComputedStyle(probe).color;
    return alpha === 1 ? rgb : rgb.replace(/^rgb\((.*)\)$/, `rgba($1, ${alpha})`);
  }

  const compact = new Intl.NumberFormat("en", { notation: "compact", maximumFractionDigits: 1 });
  const dollars = (v) => (v >= 1 || v === 0 ? `$${v.toFixed(v >= 100 ? 0 : 2)}` : `$${v.toPrecision(2)}`);

  function labelFormat(data) {
    const first = Date.parse(data.labels[0] || "");
    const last = Date.parse(data.labels[data.labels.length - 1] || "");
    const days = (last - first) / 86400000;
    const options = data.bucket_seconds >= 86400 || days > 2
      ? { month: "short", day: "numeric", ...(data.bucket_seconds < 86400 ? { hour: "2-digit", minute: "2-digit", hourCycle: "h23" } : {}) }
      : { hour: "2-digit", minute: "2-digit", hourCycle: "h23" };
    const format = new Intl.DateTimeFormat("en-GB", { timeZone: "UTC", ...options });
    return data.labels.map((iso) => format.format(new Date(iso)));
  }

  function palette() {
    return {
      ok: cssColor("--ok", 0.85),
      bad: cssColor("--bad", 0.9),
      info: cssColor("--info", 0.55),
      warn: cssColor("--warn"),
      grid: cssColor("--border"),
      text: cssColor("--muted"),
    };
  }

  function baseOptions(colors, extraScales) {
    return {
      responsive: true,
      maintainAspectRatio: false,
      animation: { duration: 250 },
      interaction: { mode: "index", intersect: false },
      plugins: {
        legend: { display: false },
        tooltip: { padding: 10, cornerRadius: 8, boxPadding: 4 },
      },
      scales: {
        x: {
          stacked: true,
          grid: { display: false },
          border: { color: colors.grid },
          ticks: { color: colors.text, maxRotation: 0, autoSkip: true, maxTicksLimit: 8 },
        },
        y: {
          stacked: true,
          beginAtZero: true,
          grid: { color: colors.grid },
          border: { display: false },
          ticks: { color: colors.text, maxTicksLimit: 5, callback: (v) => compact.format(v) },
        },
        ...extraScales,
      },
    };
  }

  // What other pages' charts share with these (experiments.js runs after this file's load).
  window.llmrotateCharts = { cssColor, labelFormat, baseOptions };

  function createCharts(canvasCalls, canvasTokens, colors) {
    const Chart = window.Chart;
    Chart.defaults.font.family = getComputedStyle(document.body).fontFamily;
    Chart.defaults.font.size = 11.5;
    const bar = { borderRadius: 2, borderSkipped: false, categoryPercentage: 0.85, barPercentage: 0.9 };
    charts.calls = new Chart(canvasCalls, {
      type: "bar",
      data: {
        labels: [],
        datasets: [
          { label: "Successes", data: [], backgroundColor: colors.ok, ...bar },
          { label: "Errors", data: [], backgroundColor: colors.bad, ...bar },
        ],
      },
      options: baseOptions(colors, {}),
    });
    const tokenOptions = baseOptions(colors, {
      y1: {
        position: "right",
        beginAtZero: true,
        grid: { display: false },
        border: { display: false },
        ticks: { color: colors.text, maxTicksLimit: 5, callback: (v) => dollars(v) },
      },
    });
    tokenOptions.scales.x.stacked = false;
    tokenOptions.scales.y.stacked = false;
    tokenOptions.plugins.tooltip.callbacks = {
      label: (ctx) => (ctx.dataset.yAxisID === "y1"
        ? ` Cost ${dollars(ctx.parsed.y)}`
        : ` Tokens ${compact.format(ctx.parsed.y)}`),
    };
    charts.tokens = new Chart(canvasTokens, {
      data: {
        labels: [],
        datasets: [
          { type: "line", label: "Cost", data: [], yAxisID: "y1", borderColor: colors.warn, backgroundColor: colors.warn, borderWidth: 2, pointRadius: 0, tension: 0.3 },
          { type: "bar", label: "Tokens", data: [], yAxisID: "y", backgroundColor: colors.info, ...bar },
        ],
      },
      options: tokenOptions,
    });
  }

  function updateCharts() {
    const source = document.getElementById("timeseries-data");
    const canvasCalls = document.getElementById("chart-calls");
    const canvasTokens = document.getElementById("chart-tokens");
    if (!source || !canvasCalls || !canvasTokens || !window.Chart || source === shownData) return;
    shownData = source;
    const data = JSON.parse(source.textContent);
    for (const card of document.querySelectorAll("[data-chart-card]")) {
      card.classList.toggle("is-empty", data.empty);
      // "None in this frame" or "none yet": the first call may arrive while the page is open.
      for (const text of card.querySelectorAll("[data-empty-when]")) {
        text.hidden = (text.dataset.emptyWhen === "ever") !== data.ever_called;
      }
    }
    // Nothing to draw yet: the cards say what will be there; the charts start with data.
    if (data.empty && !charts.calls) return;
    if (!charts.calls) createCharts(canvasCalls, canvasTokens, palette());
    const labels = labelFormat(data);
    charts.calls.data.labels = labels;
    charts.calls.data.datasets[0].data = data.successes;
    charts.calls.data.datasets[1].data = data.errors;
    charts.tokens.data.labels = labels;
    charts.tokens.data.datasets[0].data = data.cost;
    charts.tokens.data.datasets[1].data = data.tokens;
    charts.calls.update();
    charts.tokens.update();
  }

  function recolorCharts() {
    if (!charts.calls) return;
    const colors = palette();
    charts.calls.data.datasets[0].backgroundColor = colors.ok;
    charts.calls.data.datasets[1].backgroundColor = colors.bad;
    charts.tokens.data.datasets[0].borderColor = colors.warn;
    charts.tokens.data.datasets[0].backgroundColor = colors.warn;
    charts.tokens.data.datasets[1].backgroundColor = colors.info;
    for (const chart of Object.values(charts)) {
      for (const [name, scale] of Object.entries(chart.options.scales)) {
        scale.ticks.color = colors.text;
        if (name !== "y1") scale.grid.color = colors.grid;
        if (scale.border) scale.border.color = colors.grid;
      }
      chart.update("none");
    }
  }

  updateCharts();
})();
