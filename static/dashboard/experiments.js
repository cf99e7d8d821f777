// llmrotate dashboard, Experiments page: one activation chart per replacement rule.
// The panel re-renders itself by HTMX polling; each chart's box is kept across polls
// (hx-preserve), and each new copy of the rule's JSON (its json_script) is fed to the chart
// in place, as app.js does for the overview's charts.
(() => {
  "use strict";

  const charts = new Map(); // canvas id -> Chart
  const shown = new Map(); // canvas id -> the json_script element last drawn
  // Colours, time labels and options as the overview's charts (app.js).
  const shared = () => window.llmrotateCharts;

  function palette() {
    const { cssColor } = shared();
    return {
      eligible: cssColor("--muted", 0.3),
      replaced: cssColor("--info", 0.85),
      grid: cssColor("--border"),
      text: cssColor("--muted"),
    };
  }

  function create(canvas, colors) {
    const Chart = window.Chart;
    Chart.defaults.font.family = getComputedStyle(document.body).fontFamily;
    Chart.defaults.font.size = 11.5;
    // The replaced bar is drawn over its bucket's eligible bar (never taller): one column per
    // bucket, the share replaced read at a glance.
    const bar = { borderRadius: 2, borderSkipped: false, categoryPercentage: 0.85, barPercentage: 0.9, grouped: false };
    const options = shared().baseOptions(colors, {});
    // Overlaid, not stacked: the replaced bar stands in front of its bucket's eligible bar.
    options.scales.x.stacked = false;
    options.scales.y.stacked = false;
    options.scales.y.ticks.precision = 0;
    return new Chart(canvas, {
      type: "bar",
      data: {
        labels: [],
        datasets: [
          { label: gettext("Replaced"), data: [], backgroundColor: colors.replaced, order: 0, ...bar },
          { label: gettext("Eligible"), data: [], backgroundColor: colors.eligible, order: 1, ...bar },
        ],
      },
      options,
    });
  }

  function update() {
    if (!window.Chart) return;
    let colors = null;
    for (const canvas of document.querySelectorAll("canvas[data-activation-chart]")) {
      const source = document.getElementById(canvas.dataset.activationChart);
      if (!source || shown.get(canvas.id) === source) continue;
      shown.set(canvas.id, source);
      const data = JSON.parse(source.textContent);
      // Nothing to draw yet: the card says what will be there; the chart starts with data.
      // A canvas drawn anew (not kept by hx-preserve) needs a chart of its own.
      const old = charts.get(canvas.id);
      if (old && old.canvas !== canvas) {
        old.destroy();
        charts.delete(canvas.id);
      }
      if (data.empty && !charts.has(canvas.id)) continue;
      if (!charts.has(canvas.id)) {
        colors = colors || palette();
        charts.set(canvas.id, create(canvas, colors));
      }
      const chart = charts.get(canvas.id);
      chart.data.labels = shared().labelFormat(data);
      chart.data.datasets[0].data = data.replaced;
      chart.data.datasets[1].data = data.eligible;
      chart.update();
    }
    // A rule gone from the page (deleted, or out of the frame) takes its chart with it.
    for (const [id, chart] of charts) {
      if (!chart.canvas.isConnected) {
        chart.destroy();
        charts.delete(id);
        if (!document.getElementById(id)) shown.delete(id);
      }
    }
  }

  function recolor() {
    if (!charts.size) return;
    const colors = palette();
    for (const chart of charts.values()) {
      chart.data.datasets[0].backgroundColor = colors.replaced;
      chart.data.datasets[1].backgroundColor = colors.eligible;
      for (const scale of Object.values(chart.options.scales)) {
        scale.ticks.color = colors.text;
        if (scale.grid.color !== undefined) scale.grid.color = colors.grid;
        if (scale.border) scale.border.color = colors.grid;
      }
      chart.update("none");
    }
  }

  document.body.addEventListener("htmx:afterSettle", update);
  // theme.js announces every change of the page's colours (a pick, or the system's scheme).
  document.addEventListener("llmrotate:theme", recolor);
  // Deferred scripts run in order, this one before app.js: start once all have run.
  document.addEventListener("DOMContentLoaded", update);
})();
