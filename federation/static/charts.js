// Draws each <canvas data-chart="ID"> of an edufl dashboard page as a line chart of the JSON in <script id="ID">:
// {time, xTitle, yTitle, y2Title?, series: [{label, points: [[x, y], ...], axis?: "y2", dashed?}]}; x is a round number,
// or with time a UTC time in milliseconds.
(function () {
  const colors = ["#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#e377c2"];
  const utc = (ms) => new Date(ms).toISOString().slice(0, 16).replace("T", " ");
  document.querySelectorAll("canvas[data-chart]").forEach((canvas) => {
    const spec = JSON.parse(document.getElementById(canvas.dataset.chart).textContent);
    const scales = {
      x: { type: "linear", title: { display: true, text: spec.xTitle }, ticks: spec.time ? { callback: utc } : { precision: 0 } },
      y: { title: { display: true, text: spec.yTitle }, beginAtZero: true },
    };
    if (spec.y2Title) {
      scales.y2 = { position: "right", title: { display: true, text: spec.y2Title }, grid: { drawOnChartArea: false }, beginAtZero: true };
    }
    let plain = 0;
    const datasets = spec.series.map((s) => {
      const color = s.dashed ? "#d62728" : s.axis === "y2" ? "#d62728" : colors[plain++ % colors.length];
      return {
        label: s.label,
        data: s.points.map(([x, y]) => ({ x, y })),
        yAxisID: s.axis || "y",
        borderColor: color,
        backgroundColor: color,
        borderDash: s.dashed ? [6, 4] : [],
        pointRadius: s.dashed ? 0 : 3,
      };
    });
    new Chart(canvas, {
      type: "line",
      data: { datasets },
      options: {
        animation: false,
        maintainAspectRatio: false,
        scales,
        plugins: { tooltip: { callbacks: { title: (items) => (spec.time ? utc(items[0].parsed.x) : `round ${items[0].parsed.x}`) } } },
      },
    });
  });
})();
