// The status page's charts (served after uPlot in /admin/status.js): each <figure data-chart>
// is drawn from the history in #status-data, and the history is fetched again every sample
// interval, so the charts follow the edge while the page is open.
(function () {
  'use strict';
  const palette = ['#2f6fdb', '#d9480f', '#2b8a3e', '#862e9c', '#e8590c', '#0b7285', '#c2255c', '#5c940d'];
  const charts = {};

  // The series of chart `id` from the history: [xs, ys…] and their labels.
  function series(id, data) {
    const xs = data.samples.map((s) => s.at_ms / 1000);
    if (id === 'latency' || id === 'ttft' || id === 'in_flight') {
      const field = id === 'latency' ? 'latency_ms' : id === 'ttft' ? 'ttft_ms' : 'in_flight';
      return {
        labels: data.targets,
        columns: [xs].concat(data.targets.map((_, i) => data.samples.map((s) => s.targets[i]?.[field] ?? null))),
      };
    }
    if (id === 'cache') {
      const ys = data.samples.map((s, i) => {
        if (i === 0) return null;
        const p = data.samples[i - 1];
        const hits = s.cache_hits - p.cache_hits;
        const total = hits + s.cache_misses - p.cache_misses;
        return total > 0 ? (100 * hits) / total : null;
      });
      return { labels: ['hit rate'], columns: [xs, ys] };
    }
    const tenants = [...new Set(data.samples.flatMap((s) => Object.keys(s.cost_usd)))].sort();
    return { labels: tenants, columns: [xs].concat(tenants.map((t) => data.samples.map((s) => s.cost_usd[t] ?? 0))) };
  }

  function draw(data) {
    for (const figure of document.querySelectorAll('figure[data-chart]')) {
      const id = figure.dataset.chart;
      const { labels, columns } = series(id, data);
      const key = id + ':' + labels.join('\u0000');
      if (charts[id] && charts[id].key === key) {
        charts[id].plot.setData(columns);
        continue;
      }
      if (charts[id]) charts[id].plot.destroy();
      // Costs are fractions of a cent: their axis shows significant digits, not rounded units.
      const small = (u, values) => values.map((v) => (v === 0 ? '0' : String(+v.toPrecision(2))));
      const opts = {
        width: 460,
        height: 200,
        scales: { x: { time: true } },
        axes: [{}, id === 'cost' ? { values: small, size: 84 } : {}],
        series: [{}].concat(labels.map((label, i) => ({ label, stroke: palette[i % palette.length], width: 2, spanGaps: false }))),
      };
      charts[id] = { key, plot: new uPlot(opts, columns, figure) };
    }
  }

  const data = JSON.parse(document.getElementById('status-data').textContent);
  draw(data);
  setInterval(() => {
    fetch('/admin/status.json', { credentials: 'same-origin' })
      .then((r) => (r.ok ? r.json() : Promise.reject(r.status)))
      .then(draw)
      .catch(() => {});
  }, Math.max(1000, data.interval_ms));
})();
