// Usage: tokens and requests by user, model and key over time, as a chart and a table, with CSV export.
import { api, clear, field, h, num, panel, select, table } from "../lib.js";
import { barChart } from "../chart.js";

const DAY = 86400000;

export async function render(container, { signal }) {
  const isoDay = (t) => new Date(t).toISOString().slice(0, 10);
  const since = h("input", { type: "text", name: "since", value: isoDay(Date.now() - 13 * DAY), inputmode: "numeric",
    placeholder: "YYYY-MM-DD" });
  const until = h("input", { type: "text", name: "until", value: "", placeholder: "now", inputmode: "numeric" });
  const bucket = select([["day", "Day"], ["hour", "Hour"]], { name: "bucket", value: "day" });
  const group = select([["user", "User"], ["model", "Model"], ["key_name", "Key"]], { name: "group", value: "user" });
  const exportLink = h("a", { class: "button secondary", download: "usage.csv" }, "Export CSV");
  const form = h("form", {}, h("div", { class: "fields" }, field("Since", since, "A date (YYYY-MM-DD) or an ISO time."),
    field("Until", until), field("Per", bucket), field("Split the chart by", group)),
  h("div", { class: "row" }, h("button", { type: "submit" }, "Show"), exportLink));
  const totals = h("div", { class: "stats" });
  const chart = h("div");
  const rows = h("div");
  clear(container, panel("Filters", form), panel("Totals", totals), panel("Tokens over time", chart), panel("Breakdown", rows));

  async function load() {
    const q = new URLSearchParams({ bucket: bucket.value });
    if (since.value.trim()) q.set("since", since.value.trim());
    if (until.value.trim()) q.set("until", until.value.trim());
    exportLink.href = `/api/usage?${q}&format=csv`;
    const data = (await api(`/api/usage?${q}`, { signal })).data;
    const sum = (f) => data.reduce((a, r) => a + r[f], 0);
    clear(totals, [["Requests", sum("requests")], ["Prompt tokens", sum("prompt_tokens")],
      ["Completion tokens", sum("completion_tokens")], ["Total tokens", sum("total_tokens")]].map(([label, value]) =>
      h("div", { class: "stat" }, h("span", { class: "label" }, label), h("span", { class: "value" }, num(value)))));
    const buckets = [...new Set(data.map((r) => r.bucket))].sort();
    const groups = [...new Set(data.map((r) => r[group.value] || "(none)"))].slice(0, 4);
    const classes = ["c1", "c2", "c3", "c4"];
    const bars = buckets.map((b) => ({ label: bucket.value === "day" ? b.slice(5) : b.slice(11, 13) + "h",
      parts: groups.map((g, i) => ({ cls: classes[i], value: data.filter((r) => r.bucket === b && (r[group.value] || "(none)") === g)
        .reduce((a, r) => a + r.total_tokens, 0) })) }));
    clear(chart, buckets.length ? [
      h("div", { class: "legend" }, groups.map((g, i) => h("span", {}, h("span", { class: `swatch ${classes[i]}` }), g))),
      barChart(bars, { label: `Total tokens per ${bucket.value}, split by ${group.value.replace("_name", "")}: ${groups.join(", ")}` }),
    ] : h("p", { class: "empty" }, "No usage in this period."));
    clear(rows, table([
      { label: bucket.value === "day" ? "Day" : "Hour", value: (r) => r.bucket },
      { label: "User", value: (r) => r.user || "—" },
      { label: "Key", value: (r) => r.key_name || (r.key_id ? r.key_id : "web session") },
      { label: "Model", value: (r) => r.model },
      { label: "Requests", num: true, value: (r) => num(r.requests) },
      { label: "Prompt", num: true, value: (r) => num(r.prompt_tokens) },
      { label: "Completion", num: true, value: (r) => num(r.completion_tokens) },
      { label: "Total", num: true, value: (r) => num(r.total_tokens) },
    ], data, { empty: "No usage in this period." }));
  }
  form.addEventListener("submit", (event) => { event.preventDefault(); load(); });
  await load();
}
