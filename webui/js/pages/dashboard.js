// Dashboard: live (every 2 s) per-model tokens/s, time to first token p50/p95, requests, errors and queue depth;
// the cache hit ratio; memory of loaded models against the budget; disk; worker health; recent alerts.
import { api, badge, bytes, clear, every, h, ms, num, panel, pct, table } from "../lib.js";
import { lineChart, meter } from "../chart.js";

const POINTS = 60; // two minutes at one sample every 2 s

export async function render(container, { signal }) {
  const history = new Map(); // model -> {tps: [], rps: [], p50: [], p95: []}
  let previous = null;
  const overview = h("div", { class: "grid-3" });
  const models = h("div", { class: "grid-2" });
  const workers = h("div");
  const alerts = h("div");
  const updated = h("p", { class: "muted", "aria-live": "off" });
  clear(container, updated, overview, h("h2", {}, "Models"), models, panel("Workers", workers), panel("Recent alerts", alerts));

  async function tick() {
    const data = await api("/api/dashboard", { signal });
    const dt = previous ? Math.max(0.5, data.at - previous.at) : null;
    for (const m of data.models) {
      const before = previous?.models.find((p) => p.model === m.model);
      const series = history.get(m.model) || { tps: [], rps: [], eps: [], p50: [], p95: [] };
      if (dt && before) {
        series.tps.push(Math.max(0, (m.completion_tokens - before.completion_tokens) / dt));
        series.rps.push(Math.max(0, (m.requests - before.requests) / dt));
        series.eps.push(Math.max(0, (m.errors - before.errors) / dt));
      }
      series.p50.push(m.ttft_p50 ?? NaN);
      series.p95.push(m.ttft_p95 ?? NaN);
      for (const key of Object.keys(series)) series[key] = series[key].slice(-POINTS);
      history.set(m.model, series);
    }
    previous = data;
    draw(data);
  }

  function draw(data) {
    updated.textContent = `Updated ${new Date(data.at * 1000).toLocaleTimeString()} · refreshes every 2 s`;
    const mem = data.memory;
    const budget = mem.budget_bytes || mem.total_bytes;
    const hits = data.cache;
    clear(overview,
      card("Memory used by models", bytes(mem.models_bytes), meter(mem.models_bytes, budget, "Model memory against the budget"),
        `budget ${bytes(budget)} · ${bytes(mem.available_bytes)} free of ${bytes(mem.total_bytes)}`),
      card("Disk used", bytes(data.disk.total_bytes - data.disk.free_bytes), meter(data.disk.total_bytes - data.disk.free_bytes, data.disk.total_bytes, "Disk used"),
        `${bytes(data.disk.free_bytes)} free · data ${bytes(data.disk.data_bytes)}`),
      card("Response cache hit ratio", hits.hits + hits.misses ? pct(hits.hit_ratio) : "no lookups yet", meter(hits.hits, hits.hits + hits.misses || 1, "Cache hit ratio"),
        `${num(hits.hits)} hits · ${num(hits.misses)} misses`),
      ...data.gpus.map((g) => card(`${g.name} VRAM used`, bytes(g.memory_used_bytes),
        meter(g.memory_used_bytes, g.memory_total_bytes, `${g.name} memory`), `of ${bytes(g.memory_total_bytes)}`)));
    const active = data.models.filter((m) => m.state !== "unloaded" || m.requests);
    clear(models, active.length ? active.map((m) => modelCard(m, history.get(m.model)))
      : h("p", { class: "empty" }, "No model is loaded. Send a request in the Playground to load one."));
    clear(workers, table([
      { label: "Model", value: (m) => m.model },
      { label: "State", value: (m) => badge(m.state, m.state === "ready" ? "ok" : m.state === "failed" ? "bad" : m.state === "loading" ? "info" : "") },
      { label: "Health", value: (m) => (m.state === "unloaded" ? "—" : m.healthy ? badge("healthy", "ok") : badge("unhealthy", "bad")) },
      { label: "RAM", num: true, value: (m) => bytes(m.rss_bytes) },
      { label: "VRAM", num: true, value: (m) => bytes(m.vram_bytes) },
      { label: "Queue", num: true, value: (m) => num(m.queue_depth) },
      { label: "Requests", num: true, value: (m) => num(m.requests) },
      { label: "Errors", num: true, value: (m) => num(m.errors) },
    ], data.models, { empty: "No model installed." }));
    clear(alerts, data.alerts.length ? table([
      { label: "Alert", value: (a) => a.name || a.alertname },
      { label: "Severity", value: (a) => badge(a.severity || "warning", a.severity === "critical" ? "bad" : "warn") },
      { label: "Since", value: (a) => a.since || a.startsAt || "—" },
      { label: "Summary", class: "wrap", value: (a) => a.summary || "" },
    ], data.alerts) : h("p", { class: "muted" }, "No alert is firing."));
  }

  function card(title, value, picture, note) {
    return h("section", { class: "panel", "aria-label": title }, h("div", { class: "stat" },
      h("span", { class: "label" }, title), h("span", { class: "value" }, value)), picture, h("p", { class: "muted" }, note));
  }

  function modelCard(m, s) {
    const tps = s?.tps.at(-1);
    const rps = s?.rps.at(-1);
    return h("section", { class: "panel", "aria-label": `Model ${m.model}` },
      h("div", { class: "panel-head" }, h("h3", {}, m.model),
        badge(m.state, m.state === "ready" ? "ok" : m.state === "failed" ? "bad" : "info")),
      h("div", { class: "stats" },
        stat("Tokens/s", tps === undefined ? "—" : num(tps, 1)),
        stat("TTFT p50", ms(m.ttft_p50)), stat("TTFT p95", ms(m.ttft_p95)),
        stat("Requests/s", rps === undefined ? "—" : num(rps, 2)),
        stat("Errors", num(m.errors)), stat("Queue", num(m.queue_depth))),
      h("h4", { class: "visually-hidden" }, "Tokens per second"),
      lineChart([{ values: s?.tps || [], cls: "c1" }], { label: `Tokens per second over the last two minutes; now ${tps === undefined ? "unknown" : num(tps, 1)}`, points: POINTS }),
      h("div", { class: "legend" }, h("span", {}, h("span", { class: "swatch c1" }), "tokens/s"),
        h("span", {}, h("span", { class: "swatch c2" }), "TTFT p50"), h("span", {}, h("span", { class: "swatch c4" }), "TTFT p95")),
      lineChart([{ values: s?.p50 || [], cls: "c2" }, { values: s?.p95 || [], cls: "c4" }],
        { label: `Time to first token; p50 ${ms(m.ttft_p50)}, p95 ${ms(m.ttft_p95)}`, points: POINTS, min: 0.1, unit: " s" }));
  }

  const stat = (label, value) => h("div", { class: "stat" }, h("span", { class: "label" }, label), h("span", { class: "value" }, value));

  every(2, tick, signal);
}
