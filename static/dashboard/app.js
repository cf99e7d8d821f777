// llmrotate dashboard: theme toggle, live countdowns, the request drawer, and the charts.
// The panels themselves refresh by HTMX polling (templates/dashboard/_panel.html); this file
// only adds what HTML cannot: re-polling at once when the tab becomes visible again, ticking
// timers between polls, and feeding each new copy of the chart data to Chart.js in place.
(() => {
  "use strict";

  // Timers tick against the server's clock: a laptop a minute off would otherwise show a
  // cooldown ending a minute early or late.
  const serverNow = Date.parse(document.body.dataset.serverNow || "");
  const clockOffset = Number.isNaN(serverNow) ? 0 : serverNow - Date.now();
  const now = () => Date.now() + clockOffset;

  // theme.js announces every change of the page's colours (a pick, or the system's scheme).
  document.addEventListener("llmrotate:theme", () => recolorCharts());

  // --- language and time zone -----------------------------------------------------------
  // The server renders times in the zone the llmrotate_tz cookie names (llmrotate_site/viewer.py).
  // It follows the browser's zone, or stays on UTC once the viewer picks UTC (remembered in
  // llmrotate_tz_choice). A first visit, or a laptop that travelled, sets the cookie and loads
  // the page again in the right zone; the cookie then matches and nothing reloads.
  const lang = document.documentElement.lang || "en";
  const pageZone = document.body.dataset.timeZone || "UTC";
  const YEAR = 365 * 24 * 3600;
  // Zone names are written as they are (the server reads cookies undecoded): only names made
  // of the characters IANA uses are ever written. (Not a regex literal: xgettext, which
  // collects this file's strings for translation, misreads a "/" inside one.)
  const ZONE_NAME = new RegExp("^[A-Za-z0-9_+\\-/]{1,64}$");
  const readCookie = (name) => {
    const found = document.cookie.split("; ").find((c) => c.startsWith(`${name}=`));
    return found ? found.slice(name.length + 1) : null;
  };
  const writeCookie = (name, value) => {
    const age = value === null ? 0 : YEAR;
    document.cookie = `${name}=${value ?? ""}; path=/; max-age=${age}; SameSite=Lax`;
  };
  let browserZone = "UTC";
  try {
    const zone = Intl.DateTimeFormat().resolvedOptions().timeZone;
    if (ZONE_NAME.test(zone || "")) browserZone = zone;
  } catch {
    // No Intl time zone support: UTC.
  }
  // Reloads only when this changed the cookie, and only once it really holds the zone: a
  // browser that refuses the cookie, or a zone the server does not know (it shows UTC), stays
  // on the page as it is instead of reloading for ever.
  function showIn(wanted) {
    if (readCookie("llmrotate_tz") === wanted) return;
    writeCookie("llmrotate_tz", wanted);
    if (pageZone !== wanted && readCookie("llmrotate_tz") === wanted) window.location.reload();
  }
  function useZone(choice) {
    writeCookie("llmrotate_tz_choice", choice === "utc" ? "utc" : null);
    showIn(choice === "utc" ? "UTC" : browserZone);
  }
  showIn(readCookie("llmrotate_tz_choice") === "utc" ? "UTC" : browserZone);
  document.addEventListener("click", (event) => {
    const pick = event.target.closest("[data-time-zone-pick]");
    if (pick) useZone(pick.dataset.timeZonePick);
  });
  const clockFormat = new Intl.DateTimeFormat(lang, {
    timeZone: pageZone, hour: "2-digit", minute: "2-digit", second: "2-digit", hourCycle: "h23",
  });

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
      el.textContent = left > 0 ? span(left) : gettext("now");
    }
    for (const el of document.querySelectorAll("time[data-ago]")) {
      const ago = t - Date.parse(el.dateTime);
      el.textContent = ago < 5000
        ? gettext("just now")
        : interpolate(gettext("%(span)s ago"), { span: span(ago) }, true);
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
      updatedAt.textContent = clockFormat.format(new Date(now()));
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

  // The theme's colours are custom properties (static/dashboard/themes/); the computed colour
  // of a probe resolves them, whatever form the theme wrote them in.
  function cssColor(name, alpha = 1) {
    probe.style.color = `var(${name})`;
    const rgb = getComputedStyle(probe).color;
    return alpha === 1 ? rgb : rgb.replace(/^rgb\((.*)\)$/, `rgba($1, ${alpha})`);
  }

  const compact = new Intl.NumberFormat(lang, { notation: "compact", maximumFractionDigits: 1 });
  const money = (digits) => new Intl.NumberFormat(lang, {
    style: "currency", currency: "USD", maximumFractionDigits: digits, minimumFractionDigits: 0,
  });
  const [money0, money2] = [money(0), money(2)];
  const smallMoney = new Intl.NumberFormat(lang, {
    style: "currency", currency: "USD", maximumSignificantDigits: 2,
  });
  const dollars = (v) => (v >= 100 ? money0 : v >= 1 || v === 0 ? money2 : smallMoney).format(v);

  // Bucket labels on the page's clock (its zone, its language): the buckets themselves start
  // on that clock's hours and days (common/timeframes.bucket_bounds).
  function labelFormat(data) {
    const first = Date.parse(data.labels[0] || "");
    const last = Date.parse(data.labels[data.labels.length - 1] || "");
    const days = (last - first) / 86400000;
    const options = data.bucket_seconds >= 86400 || days > 2
      ? { month: "short", day: "numeric", ...(data.bucket_seconds < 86400 ? { hour: "2-digit", minute: "2-digit", hourCycle: "h23" } : {}) }
      : { hour: "2-digit", minute: "2-digit", hourCycle: "h23" };
    const format = new Intl.DateTimeFormat(lang, { timeZone: pageZone, ...options });
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
          { label: gettext("Successes"), data: [], backgroundColor: colors.ok, ...bar },
          { label: gettext("Errors"), data: [], backgroundColor: colors.bad, ...bar },
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
        ? ` ${interpolate(gettext("Cost %(cost)s"), { cost: dollars(ctx.parsed.y) }, true)}`
        : ` ${interpolate(gettext("Tokens %(tokens)s"), { tokens: compact.format(ctx.parsed.y) }, true)}`),
    };
    charts.tokens = new Chart(canvasTokens, {
      data: {
        labels: [],
        datasets: [
          { type: "line", label: gettext("Cost"), data: [], yAxisID: "y1", borderColor: colors.warn, backgroundColor: colors.warn, borderWidth: 2, pointRadius: 0, tension: 0.3 },
          { type: "bar", label: gettext("Tokens"), data: [], yAxisID: "y", backgroundColor: colors.info, ...bar },
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
    // A theme may bring its own font (the terminal theme's monospace).
    window.Chart.defaults.font.family = getComputedStyle(document.body).fontFamily;
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
