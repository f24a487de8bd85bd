// Draws the console's charts with the vendored uPlot, from the numbers embedded in the page as JSON.
// Every number is also in the page's tables: without JavaScript nothing is lost but the pictures.
(function () {
  "use strict";
  if (typeof uPlot === "undefined") return;
  var COLORS = ["#2f6fb0", "#d9822b", "#3a9a5b", "#b04a8f", "#7a6fd0", "#8c8c8c"];

  function json(id) {
    var el = document.getElementById(id);
    return el ? JSON.parse(el.textContent) : null;
  }

  function dailyCharts() {
    var data = json("daily-data");
    if (!data) return;
    var figures = document.querySelectorAll('figure[data-chart="daily"]');
    data.forEach(function (c, i) {
      var el = figures[i];
      if (!el) return;
      var series = [{}].concat(c.series.map(function (s, k) {
        return { label: s.label, stroke: COLORS[k % COLORS.length], width: 2, spanGaps: true,
                 points: { show: true, size: 5 }, value: function (u, v) { return v == null ? "–" : v.toFixed(3); } };
      }));
      new uPlot({ title: c.language, width: 360, height: 200, series: series,
                  scales: { y: { range: [0, 1] } },
                  axes: [{}, { label: "acceptance", size: 50 }] },
                [c.x].concat(c.series.map(function (s) { return s.values; })), el);
    });
  }

  function lossChart() {
    var d = json("loss-data"), el = document.getElementById("loss-chart");
    if (!d || !el) return;
    // uPlot wants one x array: the union of train and validation steps, null where a series has no point.
    var steps = Array.from(new Set(d.step.concat(d.val_step))).sort(function (a, b) { return a - b; });
    var train = new Map(d.step.map(function (s, i) { return [s, d.train_loss[i]]; }));
    var val = new Map(d.val_step.map(function (s, i) { return [s, d.val_loss[i]]; }));
    var get = function (m) { return steps.map(function (s) { return m.has(s) ? m.get(s) : null; }); };
    new uPlot({ title: "loss (nats/token)", width: Math.min(1100, el.parentNode.clientWidth - 30), height: 320,
                scales: { x: { time: false } },
                series: [{ label: "step" },
                         { label: "train", stroke: COLORS[0], width: 1, spanGaps: true },
                         { label: "validation", stroke: COLORS[1], width: 2, spanGaps: true, points: { show: true, size: 6 } }],
                axes: [{ label: "step" }, { label: "loss", size: 50 }] },
              [steps, get(train), get(val)], el);
  }

  function roundsChart() {
    var d = json("rounds-data"), el = document.getElementById("rounds-chart");
    if (!d || !el) return;
    var series = [{ label: "round" }].concat(d.series.map(function (s, k) {
      return { label: s.label, stroke: COLORS[k % COLORS.length], width: 2, spanGaps: true, points: { show: true, size: 6 } };
    }));
    new uPlot({ width: Math.min(900, el.parentNode.clientWidth - 30), height: 260, series: series,
                scales: { x: { time: false } }, axes: [{ label: "round", incrs: [1] }, { size: 50 }] },
              [d.x].concat(d.series.map(function (s) { return s.values; })), el);
  }

  dailyCharts();
  lossChart();
  roundsChart();
})();
